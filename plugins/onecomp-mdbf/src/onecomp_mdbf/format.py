"""Format ``mdbf``: ``Ŵ = Σ_p F⁽ᵖ⁾ G⁽ᵖ⁾`` with ``F = S_A ⊙ (A Q_Uᵀ)`` and ``G = S_B ⊙ (Q_V Bᵀ)``.

Shared ±1 sign bases with a rank-``l`` real envelope on each side (``l = 1`` is DBF). For a
weight ``[n, m] = [out, in]`` with params ``rank`` r, ``envelope_rank`` l and ``terms`` P:

========  =======  =====================  ===============================================
S_A_bits  uint8    ``[P, n, ceil(r/8)]``  signs of F, a little-endian bit stream per row
S_B_bits  uint8    ``[P, r, ceil(m/8)]``  signs of G, likewise (bit 1 = +1, 0 = −1)
A         float16  ``[P, n, l]``          output-side envelope of F
Q_U       float16  ``[P, r, l]``          middle-side envelope of F
Q_V       float16  ``[P, r, l]``          middle-side envelope of G
B         float16  ``[P, m, l]``          input-side envelope of G
========  =======  =====================  ===============================================

Bits = P·[8n·ceil(r/8) + 8r·ceil(m/8) + 16·l(n + m + 2r)], which is
P·[r(n+m) + 16·l(n+m+2r)] exactly when r and m are multiples of 8.
"""

from __future__ import annotations

import math

import attrs
import torch

from onecomp import Format, FormatError, in_range

SIGNS = ("S_A", "S_B")
ENVELOPES = ("A", "Q_U", "Q_V", "B")


@attrs.define
class MDBFParams:
    rank: int = attrs.field(default=8, validator=in_range(1, 2**20))  # r, the middle dimension
    envelope_rank: int = attrs.field(default=1, validator=in_range(1, 1024))  # l
    terms: int = attrs.field(default=2, validator=in_range(1, 64))  # P


def pack_signs(S: torch.Tensor) -> torch.Tensor:
    """``[..., k]`` of ±1 → ``[..., ceil(k/8)]`` uint8: element ``8j + b`` is bit ``b`` of byte ``j``
    (1 for +1); the padding bits of the last byte are zero."""
    k = S.shape[-1]
    bits = torch.nn.functional.pad((S > 0).to(torch.int32), (0, (-k) % 8))
    bits = bits.reshape(*S.shape[:-1], -1, 8) << torch.arange(8, dtype=torch.int32)
    return bits.sum(-1).to(torch.uint8)


def unpack_signs(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of pack_signs: ``[..., ceil(k/8)]`` uint8 → ``[..., k]`` int8 of ±1."""
    bits = (packed.to(torch.int32)[..., None] >> torch.arange(8, dtype=torch.int32)) & 1
    bits = bits.reshape(*packed.shape[:-1], -1)[..., :k]
    return (2 * bits - 1).to(torch.int8)


def mdbf_bits(n: int, m: int, r: int, l: int, P: int) -> int:
    """The bits of the format's formula, P·[r(n+m) + 16·l(n+m+2r)] (no padding)."""
    return P * (r * (n + m) + 16 * l * (n + m + 2 * r))


class MDBFFormat(Format):
    """Multi-envelope double binary factorization: packed sign bases, fp16 envelopes."""

    name = "mdbf"
    version = 1
    Config = MDBFParams
    trainable = ENVELOPES
    #: latents start at ±1 (the default latent_init): starting them at sign × envelope magnitude made
    #: STE sign flips easier, and on a SmolLM2 layer those flips raised the output error (README)
    discrete = {"S_A": "sign", "S_B": "sign"}

    def _dims(self, shape):
        p = self.params
        return shape[0], shape[1], p.rank, p.envelope_rank, p.terms

    def field_shapes(self, shape) -> dict[str, tuple[int, ...]]:
        n, m, r, l, P = self._dims(shape)
        return {"S_A": (P, n, r), "S_B": (P, r, m), "A": (P, n, l), "Q_U": (P, r, l), "Q_V": (P, r, l),
                "B": (P, m, l)}

    def stored_shapes(self, shape):
        n, m, r, l, P = self._dims(shape)
        half = torch.float16
        return {"S_A_bits": ((P, n, math.ceil(r / 8)), torch.uint8), "S_B_bits": ((P, r, math.ceil(m / 8)), torch.uint8),
                "A": ((P, n, l), half), "Q_U": ((P, r, l), half), "Q_V": ((P, r, l), half), "B": ((P, m, l), half)}

    def expected_bits(self, shape):
        n, m, r, l, P = self._dims(shape)
        return P * (8 * n * math.ceil(r / 8) + 8 * r * math.ceil(m / 8) + 16 * l * (n + m + 2 * r))

    def pack(self, fields, shape):
        want = self.field_shapes(shape)
        missing = sorted(set(want) - set(fields))
        if missing:
            raise FormatError(f"mdbf: fields {missing} are missing")
        wrong = {k: tuple(fields[k].shape) for k in want if tuple(fields[k].shape) != want[k]}
        if wrong:
            raise FormatError(f"mdbf: fields {wrong} do not fit shape {tuple(shape)}; expected "
                              f"{ {k: want[k] for k in wrong} }")
        for k in SIGNS:
            if not ((fields[k] == 1) | (fields[k] == -1)).all():
                raise FormatError(f"mdbf: sign field {k} must hold only +1 and -1")
        stored = {"S_A_bits": pack_signs(fields["S_A"]), "S_B_bits": pack_signs(fields["S_B"])}
        for k in ENVELOPES:
            t = fields[k].detach().to(torch.float16).contiguous()
            if not torch.isfinite(t).all():
                raise FormatError(f"mdbf: envelope {k} is not finite in float16")
            stored[k] = t
        return stored

    def unpack(self, stored, shape):
        n, m, r, l, P = self._dims(shape)
        return {"S_A": unpack_signs(stored["S_A_bits"], r), "S_B": unpack_signs(stored["S_B_bits"], m),
                **{k: stored[k] for k in ENVELOPES}}

    def dequantize_fields(self, f, shape):
        F = f["S_A"].float() * (f["A"].float() @ f["Q_U"].float().mT)  # [P, n, r]
        G = f["S_B"].float() * (f["Q_V"].float() @ f["B"].float().mT)  # [P, r, m]
        return (F @ G).sum(0)

    def linear(self, x, stored, shape, bias=None):
        """``x Ŵᵀ + b`` as two sign matmuls per term with channel scaling around them, never forming Ŵ:
        G x = Σ_t Q_V[:, t] ⊙ S_B (B[:, t] ⊙ x), then F h = Σ_t A[:, t] ⊙ S_A (Q_U[:, t] ⊙ h)."""
        f = self.unpack(stored, shape)
        n, m = shape
        X = x.reshape(-1, m)
        y = X.new_zeros(X.shape[0], n)
        for p in range(self.params.terms):
            A, Q_U, Q_V, B = (f[k][p].to(x.dtype) for k in ENVELOPES)
            S_A, S_B = f["S_A"][p].to(x.dtype), f["S_B"][p].to(x.dtype)
            h = ((X[:, None, :] * B.T) @ S_B.T * Q_V.T).sum(1)  # [T, l, m] → [T, l, r] → [T, r]
            y = y + ((h[:, None, :] * Q_U.T) @ S_A.T * A.T).sum(1)  # [T, l, r] → [T, l, n] → [T, n]
        y = y.reshape(*x.shape[:-1], n)
        return y + bias if bias is not None else y

    def example(self, shape, generator):
        fs = self.field_shapes(shape)
        out = {k: (torch.randint(0, 2, fs[k], generator=generator) * 2 - 1).to(torch.int8) for k in SIGNS}
        for k in ENVELOPES:
            out[k] = (torch.randn(fs[k], generator=generator) * 0.3).to(torch.float16)
        return out
