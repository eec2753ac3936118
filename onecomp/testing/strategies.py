"""Hypothesis strategies for plugin tests. They generate valid cases only.

Weights are ``[out, in]``; group sizes follow onecomp's protocol (``-1`` is per
channel, any positive size is allowed and the last group of a row may be shorter,
so a size need not divide ``in`` and may exceed it). Statistics follow
``onecomp.components.STATISTICS``: ``H = 2/N · X̂ᵀX̂``, ``cross = 2/N · (X − X̂)ᵀX̂``,
``diag = mean(x̂²)``.
"""

from __future__ import annotations

from typing import Iterable

import attrs
import torch
from hypothesis import strategies as st

from ..components import STATISTICS, LayerStats, LayerTask
from ..validation import build_config
from ..errors import ConfigError

__all__ = ["shapes", "bit_widths", "group_sizes", "float_dtypes", "weights", "configs", "param_dicts",
           "layer_tasks", "activations", "make_stats", "make_task", "COMMON_GROUP_SIZES"]

#: group sizes seen in practice; offered whatever ``in_features`` is (a group may be longer than a row)
COMMON_GROUP_SIZES = (32, 64, 128)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def shapes(max_out: int = 64, max_in: int = 300, multiple_of: int | None = None, min_out: int = 1,
           min_in: int = 1) -> st.SearchStrategy[tuple[int, int]]:
    """Weight shapes ``(out, in)``; ``in`` a multiple of ``multiple_of`` when given."""
    outs = st.integers(min_out, max_out)
    if multiple_of:
        lo = max(1, -(-min_in // multiple_of))
        hi = max(lo, max_in // multiple_of)
        ins = st.integers(lo, hi).map(lambda k: k * multiple_of)
    else:
        ins = st.integers(min_in, max_in)
    return st.tuples(outs, ins)


def bit_widths(lo: int = 1, hi: int = 8) -> st.SearchStrategy[int]:
    """Integer bit widths in ``[lo, hi]``."""
    return st.integers(lo, hi)


def group_sizes(in_features: int) -> st.SearchStrategy[int]:
    """``-1`` (per channel), a common size, a divisor of ``in_features``, or any size up to it.

    Sizes that do not divide ``in_features`` are valid: the last group of a row is shorter.
    """
    divisors = [d for d in range(1, in_features + 1) if in_features % d == 0]
    return st.one_of(st.just(-1), st.sampled_from(COMMON_GROUP_SIZES), st.sampled_from(divisors),
                     st.integers(1, max(1, in_features)))


def float_dtypes() -> st.SearchStrategy[torch.dtype]:
    """The float dtypes a model may come in."""
    return st.sampled_from(FLOAT_DTYPES)


@st.composite
def weights(draw, shape: tuple[int, int], dtype: torch.dtype = torch.float32, *, outliers: bool = True,
            special_rows: bool = True, subnormals: bool = False) -> torch.Tensor:
    """A weight ``[out, in]``: seeded Gaussian at a drawn scale, plus (when asked) zero rows,
    constant rows, ``±1e4`` outliers and subnormal entries. Always finite."""
    out, inn = shape
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.02, 1.0, 1e-3]))
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g) * scale
    if special_rows:
        rows = st.integers(0, out - 1)
        for r in draw(st.lists(rows, max_size=min(out, 3), unique=True)):
            W[r] = 0.0
        for r in draw(st.lists(rows, max_size=min(out, 3), unique=True)):
            W[r] = draw(st.sampled_from([-1.0, 0.5, 3.0])) * scale
    if outliers:
        cells = st.tuples(st.integers(0, out - 1), st.integers(0, inn - 1), st.sampled_from([-1e4, 1e4]))
        for r, c, v in draw(st.lists(cells, max_size=3)):
            W[r, c] = v
    if subnormals:
        tiny = torch.finfo(dtype).tiny / 4
        cells = st.tuples(st.integers(0, out - 1), st.integers(0, inn - 1))
        for r, c in draw(st.lists(cells, max_size=3)):
            W[r, c] = tiny
    return W.to(dtype)


def configs(cls: type, **fields: st.SearchStrategy) -> st.SearchStrategy:
    """Valid instances of the attrs class ``cls``: the given fields drawn from their strategies,
    the others left at their defaults; draws its validators refuse are filtered out."""

    def build(kw):
        try:
            return build_config(cls, kw)
        except ConfigError:
            return None

    return st.fixed_dictionaries(fields).map(build).filter(lambda c: c is not None)


def param_dicts(cls: type, **fields: st.SearchStrategy) -> st.SearchStrategy[dict]:
    """Like ``configs`` but as plain dicts (what ``Format.from_dict`` and config files take)."""
    return configs(cls, **fields).map(attrs.asdict)


# ------------------------------------------------------------------ layer tasks


def activations(n_tokens: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """Seeded activations ``[n_tokens, in]`` with uneven channel scales and some correlation,
    so Hessians look like a real layer's rather than a multiple of the identity."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_tokens, in_features, generator=g)
    mix = torch.eye(in_features) + 0.3 * torch.randn(in_features, in_features, generator=g) / in_features**0.5
    scales = torch.exp(0.5 * torch.randn(in_features, generator=g))
    return (X @ mix) * scales


def make_stats(X_hat: torch.Tensor, needs: Iterable[str], X: torch.Tensor | None = None,
               max_samples: int = 4096) -> LayerStats:
    """The statistics in ``needs`` of layer inputs ``X_hat`` (quantized path) and ``X`` (fp path),
    computed by their defining formulas (the reference the capture code is tested against)."""
    needs = set(needs)
    unknown = needs - STATISTICS
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; allowed: {sorted(STATISTICS)}")
    X_hat = X_hat.reshape(-1, X_hat.shape[-1]).float()
    n = X_hat.shape[0]
    stats = LayerStats(n_tokens=n)
    if "hessian" in needs:
        stats.H = (2.0 / n) * X_hat.T @ X_hat
    if "cross" in needs:
        if X is None:
            raise ValueError("the 'cross' statistic needs the fp-path input X")
        stats.cross = (2.0 / n) * (X.reshape(-1, X.shape[-1]).float() - X_hat).T @ X_hat
    if "diag" in needs:
        stats.diag = X_hat.square().mean(0)
    if "samples" in needs:
        stats.samples = X_hat[:max_samples].clone()
    return stats


def make_task(W: torch.Tensor | tuple[int, int], needs: Iterable[str] = (), *, seed: int = 0,
              n_tokens: int | None = None, name: str = "model.layers.0.mlp.up_proj") -> LayerTask:
    """A LayerTask for weight ``W`` (or a seeded random weight of that shape) carrying exactly
    the statistics in ``needs``, from seeded activations (``n_tokens`` ≥ 2·in by default)."""
    if isinstance(W, tuple):
        g = torch.Generator().manual_seed(seed + 1)
        W = torch.randn(W, generator=g) * 0.02
    W = W.float()
    out, inn = W.shape
    n_tokens = n_tokens or max(256, 2 * inn)
    needs = set(needs)
    stats = LayerStats()
    if needs:
        X_hat = activations(n_tokens, inn, seed)
        X = None
        if "cross" in needs:
            g = torch.Generator().manual_seed(seed + 2)
            X = X_hat + 0.05 * X_hat.std() * torch.randn(X_hat.shape, generator=g)
        stats = make_stats(X_hat, needs, X)
    return LayerTask(name=name, W=W, stats=stats, seed=seed)


@st.composite
def layer_tasks(draw, needs: Iterable[str] = (), max_out: int = 32, max_in: int = 160,
                dtype: torch.dtype = torch.float32) -> LayerTask:
    """LayerTasks with edge-case weights (see ``weights``) and the statistics in ``needs``."""
    shape = draw(shapes(max_out, max_in))
    W = draw(weights(shape, dtype)).float()
    return make_task(W, needs, seed=draw(st.integers(0, 2**16)))

