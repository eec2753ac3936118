"""The uniform grid: per-row (or per-group) scale and zero point, min-max or MSE-searched."""

from __future__ import annotations

import torch


def find_params(W: torch.Tensor, bits: int, sym: bool = False, mse: bool = False, norm: float = 2.4,
                grid: int = 100, maxshrink: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point per row of ``W`` ``[rows, cols]``.

    Min-max with the range widened to include zero; ``sym`` centres it; ``mse`` shrinks
    the range over ``grid·maxshrink`` candidates and keeps the one with the least
    ``|W − Ŵ|^norm`` per row. Scales are rounded to fp16, as stored.
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

    scale, zero = params(xmin, xmax)
    if mse:
        best = torch.full_like(xmin, float("inf"))
        for i in range(int(maxshrink * grid)):
            p = 1 - i / grid
            s1, z1 = params(p * xmin, p * xmax)
            err = (fake_quantize(W, s1[:, None], z1[:, None], maxq) - W).abs().pow(norm).sum(1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s1, scale)
            zero = torch.where(better, z1, zero)
    return scale, zero


def codes(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes in [0, maxq]; ``scale``/``zero`` broadcast against ``W``."""
    return torch.clamp(torch.round(W / scale) + zero, 0, maxq)


def fake_quantize(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """``scale · (codes − zero)``: the value the format will reproduce."""
    return scale * (codes(W, scale, zero, maxq) - zero)
