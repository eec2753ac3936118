"""The representation every integer exporter reads: affine group quantization.

A format whose weights are ``Ŵ[o, j] = scales[o, g(j)] · (q[o, j] − zeros[o, g(j)])`` exposes it
through ``Format.as_affine_int(stored, shape) -> AffineInt``; exporters ask for nothing else, so
the core never learns a plugin's tensor layout.
"""

from __future__ import annotations

import math

import attrs
import torch


@attrs.frozen
class AffineInt:
    """Unsigned ``bits``-bit codes ``q [out, in]``, integer ``zeros [out, G]``, ``scales [out, G]``;
    column ``j`` is in group ``g_idx[j]`` when ``g_idx`` is given, else ``j // group_size``."""

    bits: int
    group_size: int  # columns per group; in_features for one group per row
    q: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def groups(self) -> int:
        return self.scales.shape[1]

    def static_g_idx(self) -> torch.Tensor:
        return torch.arange(self.shape[1]) // self.group_size

    def has_static_groups(self) -> bool:
        """True when every column sits in group ``j // group_size`` (no act-order permutation)."""
        return self.g_idx is None or bool(torch.equal(self.g_idx.long().cpu(), self.static_g_idx()))

    def dequantize(self) -> torch.Tensor:
        g_idx = self.static_g_idx() if self.g_idx is None else self.g_idx.long()
        return self.scales.float()[:, g_idx] * (self.q.float() - self.zeros.float()[:, g_idx])


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[rows, n]`` codes in [0, 2^bits) → ``[rows, ceil(n·bits/32)]`` int32: each row one little-endian
    bit stream (the layout of compressed-tensors' ``pack_to_int32`` and of GPTQ's ``qweight`` columns)."""
    rows, n = codes.shape
    words = math.ceil(n * bits / 32)
    offset = torch.arange(n, device=codes.device) * bits
    word, shift = offset // 32, offset % 32
    packed = torch.empty(rows, words, dtype=torch.int32, device=codes.device)
    step = max(1, 2**20 // max(n, 1))  # rows per chunk: the int64 work stays near 8 MiB whatever the layer
    for r in range(0, rows, step):
        value = codes[r:r + step].long() << shift  # < 2^40: fits int64, may spill into the next word
        out = torch.zeros(value.shape[0], words + 1, dtype=torch.long, device=codes.device)
        out.scatter_add_(1, word.expand_as(value), value & 0xFFFFFFFF)
        out.scatter_add_(1, (word + 1).expand_as(value), value >> 32)
        out = out[:, :words]
        packed[r:r + step] = torch.where(out >= 2**31, out - 2**32, out)
    return packed


def unpack_rows(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of ``pack_rows``: ``[rows, words]`` int32 → ``[rows, n]`` int64 codes."""
    rows = packed.shape[0]
    unsigned = packed.long() & 0xFFFFFFFF
    unsigned = torch.cat([unsigned, torch.zeros(rows, 1, dtype=torch.long, device=packed.device)], 1)
    offset = torch.arange(n, device=packed.device) * bits
    word, shift = offset // 32, offset % 32
    return ((unsigned[:, word] | (unsigned[:, word + 1] << 32)) >> shift) & (2**bits - 1)
