"""Quantizer ``example-absmax``: symmetric round to nearest per row on an absmax grid.

For each row ``i``: ``s[i] = clip · max_j |W[i, j]| / 127`` (rounded to fp16, as
stored) and ``q[i, j] = clamp(round(W[i, j] / s[i]), -127, 127)``. It needs no
calibration data, so a pipeline using only this quantizer runs no forward pass.
"""

from __future__ import annotations

import attrs
import torch

from onecomp import Compressed, LayerTask, Quantizer, in_range

from .format import QMAX, ExampleInt8

FP16_MAX = torch.finfo(torch.float16).max


@attrs.define
class AbsmaxConfig:
    """Parameters as written in a config table: ``{ name = "example-absmax", clip = 0.9 }``."""

    clip: float = attrs.field(default=1.0, validator=in_range(0, 1, lo_open=True))


class ExampleAbsmax(Quantizer):
    name = "example-absmax"
    Config = AbsmaxConfig
    needs = frozenset()  # statistics to capture: any of "hessian", "cross", "diag", "samples"

    def quantize(self, task: LayerTask) -> Compressed:
        W = task.W  # fp32 [out, in]; never modify it in place
        if not torch.isfinite(W).all():
            raise ValueError(f"{task.name}: the weight has non-finite values")
        step = self.config.clip * W.abs().amax(dim=1) / QMAX
        if (step > FP16_MAX).any():
            raise ValueError(f"{task.name}: weights too large for fp16 scales (max |w| {W.abs().max():.3g})")
        scale = step.to(torch.float16)  # quantize against the scale that will be stored
        safe = torch.where(scale > 0, scale.float(), torch.ones_like(step))  # all-zero or tiny rows
        codes = torch.clamp(torch.round(W / safe[:, None]), -QMAX, QMAX).to(torch.int8)
        fmt = ExampleInt8()
        tensors = fmt.pack({"codes": codes, "scale": scale}, task.shape)
        return Compressed(fmt, tensors, task.shape)
