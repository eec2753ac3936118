"""pytest plugin (entry point ``pytest11: onecomp``): fixtures and hypothesis profiles.

Loaded by every pytest run in an environment where onecomp is installed, so it
imports nothing heavy itself: torch, transformers and hypothesis are imported
inside the fixtures and hooks that need them.

Fixtures: ``registry`` (a fresh Registry, not the process-wide one), ``tiny_llama``
(a seeded 2-block random Llama) and ``calib_batch`` (seeded token ids ``[4, 32]``).
Hypothesis profiles: ``ci`` (derandomized, 25 examples, no deadline; loaded when
the ``CI`` environment variable is set) and ``dev`` (100 examples, no deadline).
"""

from __future__ import annotations

import os

import pytest


@pytest.hookimpl(tryfirst=True)  # before hypothesis' own plugin handles --hypothesis-profile
def pytest_configure(config):
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # pragma: no cover - hypothesis is a test extra
        return
    settings.register_profile("ci", derandomize=True, max_examples=25, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("dev", max_examples=100, deadline=None)
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        settings.load_profile("ci")


@pytest.fixture
def registry():
    """An isolated Registry: built-ins plus installed plugins (honouring ONECOMP_LOAD_PLUGINS and
    ONECOMP_DISABLE_PLUGINS), separate from ``Registry.default()`` so tests may register freely."""
    from onecomp.registry import Registry, _split_env

    return Registry(only=_split_env(os.environ.get("ONECOMP_LOAD_PLUGINS")),
                    blocked=_split_env(os.environ.get("ONECOMP_DISABLE_PLUGINS")) or ())


@pytest.fixture
def tiny_llama():
    """A random LlamaForCausalLM: 2 blocks, hidden 64, intermediate 128, 4 heads, 2 kv heads, vocab 256."""
    from onecomp.testing.models import make_tiny_llama

    return make_tiny_llama(seed=0)


@pytest.fixture
def calib_batch():
    """Seeded calibration token ids ``[4, 32]`` in the tiny model's vocabulary."""
    import torch

    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
