"""Format ``gptq``: ``Ŵ_ij = s_g (q_ij − z_g)`` with b-bit codes packed into int32 words.

Stored tensors, for a weight ``[out, in]`` with ``G = ceil(in / g)`` groups per row
(the last group may be shorter; ``g = in`` when ``group_size = -1``):

=========  ==========================  =====================================================
qweight    int32 ``[out, ceil(in·b/32)]``  codes, a little-endian bit stream per row
qzeros     int32 ``[ceil(out·G·b/32)]``     zero points, b-bit codes as one stream in row-major order
scales     float16 ``[out, G]``            step sizes
g_idx      int16 ``[in]``                 group of each input column (only with ``act_order``)
=========  ==========================  =====================================================

Bits per weight = b + (16 + b)/g (+ 16/out with act_order), exactly when g divides
``in`` and ``in·b`` and ``out·G·b`` are multiples of 32; otherwise the shorter last group
still stores a full scale and zero, and the zero padding of the last word (of each row
of ``qweight``, and of ``qzeros``) counts too.
"""

from __future__ import annotations

import math

import attrs
import torch

from onecomp import ConfigError, Format, FormatError, in_range
from onecomp.export import pack_rows, unpack_rows


def check_group_size(inst, attribute, value):
    """attrs validator: -1 (one group per row) or a positive group size."""
    if isinstance(value, bool) or not isinstance(value, int) or (value != -1 and value < 1):
        raise ConfigError(attribute.name, f"must be -1 (per channel) or a positive integer, got {value!r}")


@attrs.define
class GPTQParams:
    bits: int = attrs.field(default=4, validator=in_range(1, 8))
    group_size: int = attrs.field(default=128, validator=check_group_size)  # -1: one group per row
    act_order: bool = False  # columns carry a g_idx (quantized in a permuted order)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[rows, n]`` integer codes in [0, 2^bits) → ``[rows, ceil(n·bits/32)]`` int32 words.

    Each row is a little-endian bit stream: code ``j`` occupies bits ``j·bits … j·bits+bits−1``;
    a code may straddle two words. The last word of a row is zero-padded. The layout is the
    one exporters write (compressed-tensors' ``pack_to_int32``), so the core's packer serves both.
    """
    return pack_rows(codes, bits)


def unpack_codes(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of pack_codes: ``[rows, words]`` int32 → ``[rows, n]`` int64 codes."""
    return unpack_rows(packed, n, bits)


class GPTQFormat(Format):
    """Integer group quantization with fp16 scales and b-bit zero points."""

    name = "gptq"
    version = 1
    Config = GPTQParams
    trainable = ("scales",)
    discrete = {"q": "integer", "zeros": "integer"}

    def _groups(self, shape) -> tuple[int, int]:
        g = shape[1] if self.params.group_size == -1 else self.params.group_size
        return g, math.ceil(shape[1] / g)

    def default_g_idx(self, shape) -> torch.Tensor:
        g, _ = self._groups(shape)
        return torch.arange(shape[1]) // g

    def pack(self, fields, shape):
        out, inp = shape
        b = self.params.bits
        g, G = self._groups(shape)
        missing = {"q", "zeros", "scales", *(["g_idx"] if self.params.act_order else [])} - set(fields)
        if missing:
            raise FormatError(f"gptq: fields {sorted(missing)} are missing")
        q, zeros, scales = fields["q"], fields["zeros"], fields["scales"]
        if q.is_floating_point() or zeros.is_floating_point():
            raise FormatError("gptq: codes q and zeros must be integer tensors")
        if tuple(q.shape) != (out, inp) or tuple(zeros.shape) != (out, G) or tuple(scales.shape) != (out, G):
            raise FormatError(f"gptq: fields q {tuple(q.shape)}, zeros {tuple(zeros.shape)}, scales "
                              f"{tuple(scales.shape)} do not fit shape {shape} with {G} groups")
        for nm, t in (("q", q), ("zeros", zeros)):
            if t.numel() and (t.min() < 0 or t.max() >= 2**b):
                raise FormatError(f"gptq: {nm} codes must lie in [0, {2**b - 1}] for {b} bits")
        stored = {"qweight": pack_codes(q, b), "qzeros": pack_codes(zeros.reshape(1, -1), b)[0],
                  "scales": scales.to(torch.float16).contiguous()}
        if self.params.act_order:
            if G > 2**15:
                raise FormatError(f"gptq: {G} groups do not fit the int16 g_idx")
            g_idx = fields["g_idx"]
            self._check_g_idx(g_idx, inp, g, G)
            stored["g_idx"] = g_idx.to(torch.int16).contiguous()
        return stored

    @staticmethod
    def _check_g_idx(g_idx, inp, g, G):
        ok = g_idx.shape == (inp,) and not g_idx.is_floating_point() and inp > 0
        ok = ok and g_idx.min() >= 0 and g_idx.max() < G and (torch.bincount(g_idx.long(), minlength=G) <= g).all()
        if not ok:
            raise FormatError(f"gptq: g_idx must be an integer [{inp}] tensor with values in [0, {G}) "
                              f"and at most {g} columns per group")

    def check(self, stored, shape):
        super().check(stored, shape)
        if self.params.act_order:
            g, G = self._groups(shape)
            self._check_g_idx(stored["g_idx"], shape[1], g, G)

    def unpack(self, stored, shape):
        out, inp = shape
        b = self.params.bits
        _, G = self._groups(shape)
        fields = {"q": unpack_codes(stored["qweight"], inp, b),
                  "zeros": unpack_codes(stored["qzeros"][None], out * G, b).view(out, G),
                  "scales": stored["scales"]}
        if self.params.act_order:
            fields["g_idx"] = stored["g_idx"].long()
        return fields

    def snap(self, name, latent):
        return latent.round().clamp(0, 2**self.params.bits - 1)

    def as_affine_int(self, stored, shape):
        """The exporters' view (``onecomp.export.AffineInt``): codes, zeros, scales and g_idx."""
        from onecomp.export import AffineInt

        f = self.unpack(stored, shape)
        return AffineInt(self.params.bits, self._groups(shape)[0], f["q"], f["zeros"], f["scales"], f.get("g_idx"))

    def dequantize_fields(self, f, shape):
        g_idx = f["g_idx"] if self.params.act_order else self.default_g_idx(shape).to(f["q"].device)
        s = f["scales"].float()[:, g_idx]
        z = f["zeros"].float()[:, g_idx]
        return s * (f["q"].float() - z)

    def stored_shapes(self, shape):
        out, inp = shape
        b = self.params.bits
        _, G = self._groups(shape)
        shapes = {"qweight": ((out, math.ceil(inp * b / 32)), torch.int32),
                  "qzeros": ((math.ceil(out * G * b / 32),), torch.int32),
                  "scales": ((out, G), torch.float16)}
        if self.params.act_order:
            shapes["g_idx"] = ((inp,), torch.int16)
        return shapes

    def expected_bits(self, shape):
        out, inp = shape
        b = self.params.bits
        _, G = self._groups(shape)
        bits = 32 * (out * math.ceil(inp * b / 32) + math.ceil(out * G * b / 32)) + out * G * 16
        return bits + (16 * inp if self.params.act_order else 0)

    def example(self, shape, generator):
        out, inp = shape
        b = self.params.bits
        g, G = self._groups(shape)
        fields = {
            "q": torch.randint(0, 2**b, (out, inp), generator=generator),
            "zeros": torch.randint(0, 2**b, (out, G), generator=generator),
            "scales": (torch.rand(out, G, generator=generator) * 0.1 + 1e-3).to(torch.float16),
        }
        if self.params.act_order:
            perm = torch.randperm(inp, generator=generator)
            g_idx = torch.empty(inp, dtype=torch.long)
            g_idx[perm] = torch.arange(inp) // g
            fields["g_idx"] = g_idx
        return fields
