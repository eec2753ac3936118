"""The uniform grid: per-row (or per-group) scale and zero point, min-max or MSE-searched."""

from __future__ import annotations

import torch


def find_params(W: torch.Tensor, bits: int, sym: bool = False, mse: bool = False, norm: float = 2.4,
                grid: int = 100, maxshrink: float = 0.8, step: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point per row of ``W`` ``[rows, cols]``.

    Min-max with the range widened to include zero; ``sym`` centres it; ``mse`` shrinks
    the range to ``1 − i/grid`` of it, ``i < grid·maxshrink``, and keeps per row the ``i``
    with the least ``|W − Ŵ|^norm``. The search visits every ``step``-th ``i`` and then
    halves the step around each row's best (``step = 1``: every candidate, as GPTQ's
    reference code). Scales are rounded to fp16, as stored.
    """
    maxq = 2**bits - 1
    W = W.float()
    xmin = W.min(1).values.clamp(max=0)
    xmax = W.max(1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)

    def params(lo, hi):
        scale = ((hi - lo) / maxq).half().float().clamp(min=torch.finfo(torch.float16).tiny)
        if sym:
            zero = torch.full_like(scale, (maxq + 1) // 2)
        else:
            zero = torch.round(-lo / scale).clamp(0, maxq)
        return scale, zero

    if not mse:
        return params(xmin, xmax)

    n = int(maxshrink * grid)
    best = torch.full_like(xmin, float("inf"))
    best_i = torch.zeros_like(xmin)

    def consider(i, valid=None):
        """Keep, per row, candidate ``i`` (a float per row) where its error is the least yet."""
        nonlocal best, best_i
        p = (1 - i.clamp(0, n - 1).double() / grid).float()  # as a Python float would round
        s, z = params(p * xmin, p * xmax)
        # in place: a fresh tensor per operation costs more than the arithmetic on these sizes
        E = W / s[:, None]
        E.round_().add_(z[:, None]).clamp_(0, maxq).sub_(z[:, None]).mul_(s[:, None]).sub_(W).abs_()
        err = E.pow_(norm).sum(1)
        better = err < best if valid is None else (err < best) & valid
        best = torch.where(better, err, best)
        best_i = torch.where(better, i, best_i)

    for i in range(0, n, max(step, 1)):
        consider(torch.full_like(xmin, float(i)))
    h = step // 2
    while h >= 1:
        centre = best_i.clone()
        for i in (centre - h, centre + h):
            consider(i, (i >= 0) & (i < n))
        h //= 2
    p = (1 - best_i.double() / grid).float()
    return params(p * xmin, p * xmax)


def codes(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes in [0, maxq]; ``scale``/``zero`` broadcast against ``W``."""
    return torch.clamp(torch.round(W / scale) + zero, 0, maxq)


def fake_quantize(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """``scale · (codes − zero)``: the value the format will reproduce."""
    return scale * (codes(W, scale, zero, maxq) - zero)
