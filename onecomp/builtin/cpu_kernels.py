"""Kernels of the core ``torch`` backend: run quantized linear layers from packed tensors.

* ``gptq`` with 1 to 4 bits on CPU: torch's packed int4 kernel (``_weight_int4pack_mm_for_cpu``),
  bf16 activations at the kernel's edge only. The kernel computes ``Ŵ = scale (q − 8) + zero`` per
  group of 32, 64, 128 or 256 columns, so ``Ŵ = s (q − z)`` is ``scale = s``, ``zero = s (8 − z)``.
  Groups the kernel does not take (a ragged last group, per-channel, act-order) are re-expressed:
  columns sorted by group once (the input is permuted the same way per call), then each group
  split into kernel groups of a size dividing every group boundary, repeating its scale and zero.
* ``gptq`` with other bit widths: dequantize per call in tiles of rows, then drop them.
* ``mdbf``: the format's sign matmuls, the signs unpacked per call.

The modules hold the weight once: ``stored()`` gives the format's stored tensors back (exactly),
so the QuantLinear drops its own copies (see ``QuantLinear.use_kernel``).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

#: group sizes the int4 kernel takes, largest first
INT4_GROUPS = (256, 128, 64, 32)
GPTQ_PARAMS = {"bits", "group_size", "act_order"}
TILE_BYTES = 8 << 20  # fp32 rows dequantized at a time by the per-call path


def int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` codes in [0, 16) → the int4 kernel's packed layout (it depends on the CPU)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)


def int4_unpack(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Inverse of int4_pack, ``[N, K]`` int32 codes, for any layout the packer uses: the packer only
    moves nibbles, so packing each nibble of every element's own index says where it put it."""
    index = torch.arange(N * K, dtype=torch.int64)
    lo = torch.zeros(N * K // 2, dtype=torch.int64)
    hi = torch.zeros_like(lo)
    for d in range(math.ceil(max(N * K - 1, 1).bit_length() / 4)):
        p = int4_pack(((index >> (4 * d)) & 15).view(N, K)).view(-1).long()
        lo |= (p & 15) << (4 * d)
        hi |= (p >> 4) << (4 * d)
    flat = packed.reshape(-1).long()
    q = torch.empty(N * K, dtype=torch.int32)
    q[lo] = (flat & 15).int()
    q[hi] = (flat >> 4).int()
    return q.view(N, K)


def kernel_group(boundaries: torch.Tensor, K: int) -> int | None:
    """The largest kernel group size dividing ``K`` and every group boundary, or None."""
    for gs in INT4_GROUPS:
        if K % gs == 0 and bool((boundaries % gs == 0).all()):
            return gs
    return None


class Int4Linear(nn.Module):
    """``x @ Ŵᵀ + bias`` for ``gptq`` with at most 4 bits through the packed int4 CPU kernel."""

    kernel_name = "gptq-int4pack"

    def __init__(self, fmt, shape, fields: Mapping[str, torch.Tensor], bias):
        super().__init__()
        self.fmt, self.shape = fmt, tuple(shape)
        N, K = self.shape
        g = K if fmt.params.group_size == -1 else fmt.params.group_size
        G = math.ceil(K / g)
        g_idx = fields["g_idx"].long() if "g_idx" in fields else torch.arange(K) // g
        perm = torch.argsort(g_idx, stable=True)
        boundaries = torch.cumsum(torch.bincount(g_idx, minlength=G), 0)
        self.group = kernel_group(boundaries, K)
        group_of = g_idx[perm][:: self.group]  # the gptq group of each kernel group
        s = fields["scales"].float()[:, group_of]
        z = fields["zeros"].float()[:, group_of]
        sz = torch.stack([s.T, (s * (8 - z)).T], -1).to(torch.bfloat16).contiguous()
        identity = bool((perm == torch.arange(K)).all())
        q = fields["q"] if identity else fields["q"][:, perm]
        self.register_buffer("packed", int4_pack(q), persistent=False)
        self.register_buffer("scales_and_zeros", sz, persistent=False)
        self.register_buffer("perm", None if identity else perm, persistent=False)
        # what stored() needs besides the codes (small: one zero and scale per group)
        self.register_buffer("zeros", fields["zeros"].to(torch.uint8), persistent=False)
        # clones: the loaded tensors may be views of the memory-mapped checkpoint file, which stays
        # resident while any view lives
        self.register_buffer("scales", fields["scales"].clone(), persistent=False)
        self.register_buffer("g_idx", fields["g_idx"].to(torch.int16) if "g_idx" in fields else None,
                             persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    @classmethod
    def build(cls, fmt, stored, shape, bias) -> "Int4Linear | None":
        """The module, or None when the kernel cannot take this weight."""
        N, K = shape
        if not int4_available() or fmt.params.bits > 4 or N % 16 or K % 32:
            return None
        if any(t.device.type != "cpu" for t in stored.values()):
            return None
        fields = fmt.unpack(stored, tuple(shape))
        g = K if fmt.params.group_size == -1 else fmt.params.group_size
        g_idx = fields["g_idx"].long() if "g_idx" in fields else torch.arange(K) // g
        if kernel_group(torch.cumsum(torch.bincount(g_idx, minlength=math.ceil(K / g)), 0), K) is None:
            return None
        return cls(fmt, shape, fields, bias)

    def stored(self) -> dict[str, torch.Tensor]:
        N, K = self.shape
        q = int4_unpack(self.packed, N, K).long()
        if self.perm is not None:
            q = q[:, torch.argsort(self.perm)]
        fields = {"q": q, "zeros": self.zeros.long(), "scales": self.scales}
        if self.g_idx is not None:
            fields["g_idx"] = self.g_idx.long()
        return self.fmt.pack(fields, self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, K = self.shape
        if x.device.type != "cpu":
            return self.fmt.linear(x, self.stored(), self.shape, self.bias)
        X = x.reshape(-1, K)
        if self.perm is not None:
            X = X.index_select(1, self.perm)
        sz = self.scales_and_zeros.to(torch.bfloat16)  # a no-op unless model.half() / .float() cast the buffer
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(X.to(torch.bfloat16).contiguous(), self.packed, self.group, sz)
        y = y.to(x.dtype).view(*x.shape[:-1], N)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"shape={self.shape}, kernel_group={self.group}, act_order={self.perm is not None}"


class PerCallLinear(nn.Module):
    """Runs a format from its stored tensors on every call, keeping no float copy of the weight:
    ``gptq`` dequantized in tiles of rows, ``mdbf`` through its sign matmuls."""

    def __init__(self, fmt, stored: Mapping[str, torch.Tensor], shape, bias):
        super().__init__()
        self.fmt, self.shape, self.names = fmt, tuple(shape), tuple(stored)
        for k, v in stored.items():
            self.register_buffer(k, v, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.kernel_name = f"{fmt.name}-per-call" if fmt.name != "mdbf" else "mdbf-sign-matmuls"

    def stored(self) -> dict[str, torch.Tensor]:
        return {k: self._buffers[k] for k in self.names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt.name != "gptq":
            return self.fmt.linear(x, self.stored(), self.shape, self.bias)
        N, K = self.shape
        s = self.stored()
        b, G = self.fmt.params.bits, s["scales"].shape[1]
        rows = max(32, TILE_BYTES // (4 * K) // 32 * 32)  # a multiple of 32: tiles start on a zeros word
        X = x.reshape(-1, K)
        y = torch.empty(X.shape[0], N, dtype=x.dtype, device=x.device)
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            tile = {"qweight": s["qweight"][r0:r1], "scales": s["scales"][r0:r1],
                    "qzeros": s["qzeros"][r0 * G * b // 32: math.ceil(r1 * G * b / 32)]}
            if "g_idx" in s:
                tile["g_idx"] = s["g_idx"]
            W = self.fmt.dequantize(tile, (r1 - r0, K)).to(x.dtype)
            y[:, r0:r1] = X @ W.T
        y = y.view(*x.shape[:-1], N)
        return y + self.bias.to(x.dtype) if self.bias is not None else y


def cpu_kernel(fmt, stored: Mapping[str, torch.Tensor], shape, bias) -> nn.Module | None:
    """The torch backend's module for one weight, or None (the reference path runs it)."""
    if fmt.name == "gptq":
        if set(fmt.to_dict()) - GPTQ_PARAMS:
            return None
        want = {"qweight", "qzeros", "scales"} | ({"g_idx"} if fmt.params.act_order else set())
        if set(stored) != want:
            return None
        return Int4Linear.build(fmt, stored, shape, bias) or PerCallLinear(fmt, stored, shape, bias)
    if fmt.name == "mdbf" and set(stored) == {"S_A_bits", "S_B_bits", "A", "Q_U", "Q_V", "B"}:
        return PerCallLinear(fmt, stored, shape, bias)
    return None
