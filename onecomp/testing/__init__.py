"""The conformance kit plugin authors import: hypothesis strategies and test suites.

::

    from onecomp.testing import FormatSuite, QuantizerSuite, PluginSuite, strategies

    class TestMyFormat(FormatSuite):
        component = "myformat"

See ``onecomp.testing.suites`` for what each suite checks and
``onecomp.testing.strategies`` for the generators. Fixtures (``registry``,
``tiny_llama``, ``calib_batch``) come from the pytest plugin
``onecomp.testing.pytest_plugin``, which pytest loads automatically.

Attributes are imported on first use, so loading the pytest plugin stays cheap.
"""

from __future__ import annotations

import importlib

_ATTRS = {
    "FormatSuite": "suites",
    "QuantizerSuite": "suites",
    "PluginSuite": "suites",
    "assert_tensors_equal": "suites",
    "bits_equal": "suites",
    "sqnr_db": "suites",
    "tiny_llama_config": "models",
    "make_tiny_llama": "models",
}
_SUBMODULES = ("strategies", "suites", "models", "pytest_plugin")

__all__ = [*_ATTRS, "strategies"]


def __getattr__(name):
    if name in _ATTRS:
        value = getattr(importlib.import_module(f".{_ATTRS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *__all__])
