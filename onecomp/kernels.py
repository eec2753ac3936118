"""Kernel selection: which backend runs each QuantLinear of a loaded model.

For every quantized module the backends are asked in order (``Backend.kernel``); the first that
returns a module runs it, and a module every backend declines runs the format's reference path
(dequantize, then matmul). ``backend="auto"`` asks every installed backend, plugins first (sorted
by name) and the core ``torch`` backend last.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from torch import nn

from .errors import ConfigError

REFERENCE = "reference"


def resolve_backends(backend, registry) -> list:
    """Backend instances for ``backend``: ``"auto"``, a name, a ``{"name": ..., **config}`` table,
    a list of those, or None (no kernels: every module runs the reference path)."""
    if backend is None:
        return []
    if backend == "auto":
        names = sorted(n for n in registry.names("backend") if n != "torch")
        specs = [*names, "torch"] if "torch" in registry.names("backend") else names
    elif isinstance(backend, (str, dict)):
        specs = [backend]
    elif isinstance(backend, Iterable):
        specs = list(backend)
    else:
        raise ConfigError("backend", f"must be 'auto', a backend name, a table or a list of them, got {backend!r}")
    return [registry.create(registry.resolve("backend", s, "backend")) for s in specs]


def select_kernels(model: nn.Module, backends: list, *, cache_dequantized: bool = False) -> dict[str, str]:
    """Give every QuantLinear of ``model`` the first kernel a backend offers; returns module name ->
    what runs it (a backend's name, or ``reference``). Modules left on the reference path keep a
    dequantized copy of their weight only with ``cache_dequantized``."""
    from .checkpoint.quantlinear import QuantLinear

    chosen = {}
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        m.cache_dequantized = cache_dequantized
        m.use_kernel(None)
        for b in backends:
            k = b.kernel(m.format, m.stored(), m.shape, m.bias)
            if k is not None:
                m.use_kernel(k, b.name)
                break
        chosen[name] = m.kernel_name
    return chosen


def kernel_summary(model: nn.Module) -> dict[str, int]:
    """How many QuantLinears each kernel runs, e.g. ``{"torch:gptq-int4": 210}``."""
    from .checkpoint.quantlinear import QuantLinear

    return dict(Counter(m.kernel_name for m in model.modules() if isinstance(m, QuantLinear)))
