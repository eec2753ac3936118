"""The torch reference of every kernel: dequantize with the format, then matmul.

What the tests compare the kernels with, and what a kernel module runs when the Triton path
cannot take an input (CPU tensors outside interpreter mode, autograd, an unsupported dtype)."""

from __future__ import annotations

from typing import Mapping

import torch


def reference_linear(fmt, stored: Mapping[str, torch.Tensor], shape: tuple[int, int], x: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ Ŵᵀ + bias`` with ``Ŵ = fmt.dequantize(stored, shape)`` in ``x``'s dtype and device."""
    try:
        W = fmt.dequantize(stored, tuple(shape))
    except RuntimeError:  # a format whose dequantize mixes in CPU index tensors fails on CUDA: do it on CPU
        W = fmt.dequantize({k: v.cpu() for k, v in stored.items()}, tuple(shape))
    W = W.to(device=x.device, dtype=x.dtype)
    return torch.nn.functional.linear(x, W, None if bias is None else bias.to(device=x.device, dtype=x.dtype))
