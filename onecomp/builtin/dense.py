"""Format ``dense``: the weight kept as a plain float tensor (the no-compression baseline)."""

from __future__ import annotations

import attrs
import torch

from ..components import Format
from ..validation import one_of
from ..errors import FormatError
from ..hookspecs import hookimpl

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@attrs.define
class DenseParams:
    dtype: str = attrs.field(default="float16", validator=one_of(*DTYPES))


class Dense(Format):
    """``weight`` stored as-is in ``dtype``; bits per weight = the dtype's width."""

    name = "dense"
    version = 1
    Config = DenseParams
    trainable = ("weight",)

    def pack(self, fields, shape):
        W = fields.get("weight")
        if W is None or tuple(W.shape) != tuple(shape):
            raise FormatError(f"dense: field 'weight' must have shape {tuple(shape)}, "
                              f"got {None if W is None else tuple(W.shape)}")
        return {"weight": W.to(DTYPES[self.params.dtype]).contiguous()}

    def unpack(self, stored, shape):
        return {"weight": stored["weight"]}

    def dequantize_fields(self, fields, shape):
        return fields["weight"].float()

    def expected_bits(self, shape):
        return shape[0] * shape[1] * torch.finfo(DTYPES[self.params.dtype]).bits

    def example(self, shape, generator):
        return {"weight": torch.randn(shape, generator=generator).to(DTYPES[self.params.dtype])}


@hookimpl
def register_formats(register):
    register(Dense)
