"""QuantLinear: a drop-in nn.Linear whose weight lives in a registered format's stored tensors."""

from __future__ import annotations

import torch
from torch import nn

from ..components import Compressed, Format


class QuantLinear(nn.Module):
    """Holds a format's stored tensors as buffers (so ``state_dict`` is the checkpoint) and
    computes ``x @ Ŵᵀ + b``. In inference the dequantized weight is cached once."""

    def __init__(self, fmt: Format, shape, tensors: dict, bias: torch.Tensor | None = None):
        super().__init__()
        self.format = fmt
        self.out_features, self.in_features = int(shape[0]), int(shape[1])
        for k, v in tensors.items():
            # before tensor_names exists: register_buffer probes hasattr(self, k), and for a tensor
            # called "weight" (format dense) that evaluates the ``weight`` property, which must fail
            # with AttributeError here rather than recurse
            self.register_buffer(k, v)
        self.tensor_names = tuple(tensors)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._cache: torch.Tensor | None = None

    @classmethod
    def from_compressed(cls, c: Compressed, bias=None) -> "QuantLinear":
        return cls(c.format, c.shape, c.tensors, bias)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def stored(self) -> dict:
        return {k: self._buffers[k] for k in self.tensor_names}  # not getattr: ``weight`` is a property

    def dequantize(self) -> torch.Tensor:
        return self.format.dequantize(self.stored(), self.shape)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads ``module.weight``."""
        return self.dequantize()

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trainable = torch.is_grad_enabled() and any(t.requires_grad for t in self.stored().values())
        if trainable:
            return self.format.linear(x, self.stored(), self.shape, self.bias)
        if self._cache is None or self._cache.dtype != x.dtype or self._cache.device != x.device:
            self._cache = self.dequantize().to(device=x.device, dtype=x.dtype)
        return nn.functional.linear(x, self._cache, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format.name}, " \
               f"params={self.format.to_dict()}"
