"""Format ``example-int8``: signed 8-bit codes with one fp16 scale per row.

Stored tensors for a weight ``[out, in]``:

=======  =======  ==========  ===========================================
codes    int8     [out, in]   q[i, j] in [-127, 127]
scale    float16  [out]       s[i], finite and >= 0
=======  =======  ==========  ===========================================

``Ŵ[i, j] = float32(s[i]) · q[i, j]``; bits per weight = 8 + 16/in, exactly.
"""

from __future__ import annotations

import torch

from onecomp import Format, FormatError, NoConfig

QMAX = 127  # symmetric: -128 is never used, so 0 sits in the middle of the grid


class ExampleInt8(Format):
    """Symmetric int8 codes, one fp16 scale per row. Takes no params."""

    name = "example-int8"
    version = 1  # bump on ANY change to tensor names, dtypes, shapes or meaning
    Config = NoConfig
    trainable = ("scale",)  # float fields a training refiner may tune
    discrete = {"codes": "integer"}  # tuned through a straight-through estimator, snapped by snap()

    def pack(self, fields, shape):
        out, inp = shape
        codes, scale = fields["codes"], fields["scale"]
        if tuple(codes.shape) != (out, inp) or tuple(scale.shape) != (out,):
            raise FormatError(f"example-int8: fields codes {tuple(codes.shape)} and scale {tuple(scale.shape)} "
                              f"do not fit shape {tuple(shape)}; expected ({out}, {inp}) and ({out},)")
        if codes.is_floating_point() or (codes.numel() and codes.abs().max() > QMAX):
            raise FormatError(f"example-int8: codes must be integers in [-{QMAX}, {QMAX}]")
        scale = scale.to(torch.float16)
        if not torch.isfinite(scale).all() or (scale < 0).any():
            raise FormatError("example-int8: scales must be finite and >= 0 in float16")
        return {"codes": codes.to(torch.int8).contiguous(), "scale": scale.contiguous()}

    def unpack(self, stored, shape):
        return {"codes": stored["codes"], "scale": stored["scale"]}

    def dequantize_fields(self, fields, shape):
        # called with stored integer codes, and with float latents during training
        return fields["scale"].float()[:, None] * fields["codes"].float()

    def snap(self, name, latent):
        return latent.round().clamp(-QMAX, QMAX)

    def expected_bits(self, shape):
        out, inp = shape
        return out * inp * 8 + out * 16

    def example(self, shape, generator):
        out, inp = shape
        return {"codes": torch.randint(-QMAX, QMAX + 1, (out, inp), generator=generator).to(torch.int8),
                "scale": (torch.rand(out, generator=generator) * 0.01 + 1e-4).to(torch.float16)}
