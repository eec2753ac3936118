"""Adapter formats: the weight is the adapter's ``ΔW = B A`` ``[out, in]``, kept as its two factors.

``lordba``: binary factors with channel scales, ``A ≈ diag(u_A) S_A diag(v_A)`` and
``B ≈ diag(u_B) S_B diag(v_B)``, so ``Δy = u_B ⊙ S_B((v_B ⊙ u_A) ⊙ S_A(v_A ⊙ x))``. For ``[n, m] =
[out, in]`` and rank r:

========  =======  ======================
S_A_bits  uint8    ``[r, ceil(m/8)]``     signs of A, packed along each row (bit 1 = +1)
S_B_bits  uint8    ``[n, ceil(r/8)]``     signs of B, likewise
u_A       float16  ``[r]``                row scales of A
v_A       float16  ``[m]``                column scales of A (one per input channel)
u_B       float16  ``[n]``                row scales of B (one per output channel)
v_B       float16  ``[r]``                column scales of B
========  =======  ======================

Bits = 8r·ceil(m/8) + 8n·ceil(r/8) + 16(n + m + 2r), which is r(n + m) + 16(n + m + 2r) when m and r
are multiples of 8: against fp16 LoRA's 16r(n + m) that is ``16r / (r + 16)`` smaller for wide layers
(8× at r = 16, above 10× from r = 27).

``lora``: the fp16 LoRA of the same rank, ``A`` ``[r, m]`` and ``B`` ``[n, r]`` in float16, the
comparison ``lordba`` is measured against.
"""

from __future__ import annotations

import math

import attrs
import torch

from onecomp import Format, FormatError, in_range

from .packing import pack_signs, unpack_signs


@attrs.define
class AdapterParams:
    rank: int = attrs.field(default=16, validator=in_range(1, 1 << 16))  # r


class LowRankFormat(Format):
    """What both adapter formats share: field shapes checked on pack, ``ΔW = B A``, a low-rank ``linear``."""

    Config = AdapterParams

    def field_shapes(self, shape) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def factors(self, fields) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, in], B [out, r])`` as fp32 from logical fields (differentiable)."""
        raise NotImplementedError

    def delta(self, fields, x: torch.Tensor) -> torch.Tensor:
        """``Δy = B (A x)`` from logical fields, never forming ``ΔW``."""
        A, B = self.factors(fields)
        return (x @ A.to(x.dtype).T) @ B.to(x.dtype).T

    def dequantize_fields(self, fields, shape):
        A, B = self.factors(fields)
        return B @ A

    def linear(self, x, stored, shape, bias=None):
        y = self.delta(self.unpack(stored, shape), x)
        return y + bias if bias is not None else y

    def _check_fields(self, fields, shape) -> None:
        want = self.field_shapes(shape)
        missing = sorted(set(want) - set(fields))
        if missing:
            raise FormatError(f"{self.name}: fields {missing} are missing")
        wrong = {k: tuple(fields[k].shape) for k in want if tuple(fields[k].shape) != want[k]}
        if wrong:
            raise FormatError(f"{self.name}: fields {wrong} do not fit shape {tuple(shape)}; expected "
                              f"{ {k: want[k] for k in wrong} }")

    def _half(self, t: torch.Tensor, name: str) -> torch.Tensor:
        t = t.detach().to(torch.float16).contiguous()
        if not torch.isfinite(t).all():
            raise FormatError(f"{self.name}: field {name} is not finite in float16")
        return t


def binarize(M: torch.Tensor) -> dict[str, torch.Tensor]:
    """``M ≈ diag(u) sign(M) diag(v)``: ``u vᵀ`` is the best rank-one fit of ``|M|`` (nonnegative by
    Perron–Frobenius), split evenly between the two sides. Signs of zeros are +1."""
    U, S, Vh = torch.linalg.svd(M.abs().double(), full_matrices=False)
    root = S[0].sqrt()
    return {"S": torch.where(M >= 0, 1, -1).to(torch.int8), "u": (U[:, 0].abs() * root).float(),
            "v": (Vh[0].abs() * root).float()}


class LoRDBAFormat(LowRankFormat):
    """Binary low-rank adapter: packed signs of both factors, fp16 channel scales on both sides."""

    name = "lordba"
    version = 1
    trainable = ("u_A", "v_A", "u_B", "v_B")
    discrete = {"S_A": "sign", "S_B": "sign"}

    def field_shapes(self, shape):
        n, m, r = shape[0], shape[1], self.params.rank
        return {"S_A": (r, m), "S_B": (n, r), "u_A": (r,), "v_A": (m,), "u_B": (n,), "v_B": (r,)}

    def stored_shapes(self, shape):
        n, m, r = shape[0], shape[1], self.params.rank
        half = torch.float16
        return {"S_A_bits": ((r, math.ceil(m / 8)), torch.uint8), "S_B_bits": ((n, math.ceil(r / 8)), torch.uint8),
                "u_A": ((r,), half), "v_A": ((m,), half), "u_B": ((n,), half), "v_B": ((r,), half)}

    def expected_bits(self, shape):
        n, m, r = shape[0], shape[1], self.params.rank
        return 8 * r * math.ceil(m / 8) + 8 * n * math.ceil(r / 8) + 16 * (n + m + 2 * r)

    def pack(self, fields, shape):
        self._check_fields(fields, shape)
        for k in self.discrete:
            if not ((fields[k] == 1) | (fields[k] == -1)).all():
                raise FormatError(f"lordba: sign field {k} must hold only +1 and -1")
        return {"S_A_bits": pack_signs(fields["S_A"]), "S_B_bits": pack_signs(fields["S_B"]),
                **{k: self._half(fields[k], k) for k in self.trainable}}

    def unpack(self, stored, shape, dtype=torch.int8):
        m, r = shape[1], self.params.rank
        return {"S_A": unpack_signs(stored["S_A_bits"], m, dtype), "S_B": unpack_signs(stored["S_B_bits"], r, dtype),
                **{k: stored[k] for k in self.trainable}}

    def factors(self, f):
        A = f["u_A"].float()[:, None] * f["S_A"].float() * f["v_A"].float()
        B = f["u_B"].float()[:, None] * f["S_B"].float() * f["v_B"].float()
        return A, B

    def delta(self, f, x):
        """``u_B ⊙ S_B((v_B ⊙ u_A) ⊙ S_A(v_A ⊙ x))``: two sign matmuls, channel scaling around them. The
        outer scales v_A and u_B go onto the small sign matrices ([r, in] and [out, r]) rather than onto
        the activations ([tokens, in] and [tokens, out]): the same product, less work per token."""
        dt = x.dtype
        h = x @ (f["S_A"].to(dt) * f["v_A"].to(dt)).T  # [.., r]
        h = h * (f["v_B"].to(dt) * f["u_A"].to(dt))
        return h @ (f["S_B"].to(dt) * f["u_B"].to(dt)[:, None]).T

    def linear(self, x, stored, shape, bias=None):
        fields = self.unpack(stored, shape, dtype=x.dtype)  # signs straight into x's dtype: one gather each
        y = self.delta(fields, x)
        return y + bias if bias is not None else y

    def from_factors(self, A: torch.Tensor, B: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logical fields approximating the fp factors ``A [r, in]`` and ``B [out, r]``."""
        a, b = binarize(A), binarize(B)
        return {"S_A": a["S"], "u_A": a["u"].half(), "v_A": a["v"].half(),
                "S_B": b["S"], "u_B": b["u"].half(), "v_B": b["v"].half()}

    def example(self, shape, generator):
        fs = self.field_shapes(shape)
        out = {k: (torch.randint(0, 2, fs[k], generator=generator) * 2 - 1).to(torch.int8) for k in self.discrete}
        for k in self.trainable:
            out[k] = (torch.rand(fs[k], generator=generator) + 0.05).to(torch.float16)
        return out


class LoRAFormat(LowRankFormat):
    """fp16 LoRA: ``A [r, in]`` and ``B [out, r]`` as they are (the comparison for lordba)."""

    name = "lora"
    version = 1
    trainable = ("A", "B")

    def field_shapes(self, shape):
        return {"A": (self.params.rank, shape[1]), "B": (shape[0], self.params.rank)}

    def stored_shapes(self, shape):
        return {k: (s, torch.float16) for k, s in self.field_shapes(shape).items()}

    def expected_bits(self, shape):
        return 16 * self.params.rank * (shape[0] + shape[1])

    def pack(self, fields, shape):
        self._check_fields(fields, shape)
        return {k: self._half(fields[k], k) for k in self.trainable}

    def unpack(self, stored, shape):
        return {k: stored[k] for k in self.trainable}

    def factors(self, f):
        return f["A"].float(), f["B"].float()

    def from_factors(self, A, B):
        return {"A": A.half(), "B": B.half()}

    def example(self, shape, generator):
        return {k: (torch.randn(s, generator=generator) * 0.3).to(torch.float16)
                for k, s in self.field_shapes(shape).items()}
