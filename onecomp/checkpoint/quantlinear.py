"""QuantLinear: a drop-in nn.Linear whose weight lives in a registered format's stored tensors."""

from __future__ import annotations

import torch
from torch import nn

from ..components import Compressed, Format


class QuantLinear(nn.Module):
    """Holds a format's stored tensors as buffers (so ``state_dict`` is the checkpoint) and
    computes ``x @ Ŵᵀ + b``.

    Three ways to run: a backend's ``kernel`` (``use_kernel``, chosen by ``onecomp.load``), the
    format's differentiable ``linear`` while stored tensors are trained, or the reference path,
    dequantize then matmul, with the dequantized weight kept between calls when
    ``cache_dequantized`` (what the compression pipeline wants) or dropped after each call."""

    def __init__(self, fmt: Format, shape, tensors: dict, bias: torch.Tensor | None = None,
                 cache_dequantized: bool = True):
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
        self.cache_dequantized = cache_dequantized
        self._cache: torch.Tensor | None = None
        self.kernel: nn.Module | None = None
        self.kernel_name = "reference"

    @classmethod
    def from_compressed(cls, c: Compressed, bias=None) -> "QuantLinear":
        return cls(c.format, c.shape, c.tensors, bias)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def owned_by_kernel(self) -> bool:
        """True when the kernel holds the weight (in its own layout) and gives the stored tensors back."""
        return self.kernel is not None and not any(k in self._buffers for k in self.tensor_names)

    def stored(self) -> dict:
        if self.owned_by_kernel:
            return dict(self.kernel.stored())
        return {k: self._buffers[k] for k in self.tensor_names}  # not getattr: ``weight`` is a property

    def use_kernel(self, kernel: nn.Module | None, backend: str = "") -> None:
        """Run ``forward`` through ``kernel`` (None: back to the reference path). A kernel with a
        ``stored()`` method that gives the format's stored tensors back takes them over, so the
        weight is held once, in the kernel's layout."""
        if self.owned_by_kernel:
            for k, v in self.kernel.stored().items():
                self._buffers[k] = v
        self.kernel, self._cache = kernel, None
        if kernel is None:
            self.kernel_name = "reference"
            return
        self.kernel_name = f"{backend}:{getattr(kernel, 'kernel_name', type(kernel).__name__)}"
        if callable(getattr(kernel, "stored", None)):
            for k in self.tensor_names:
                del self._buffers[k]

    def dequantize(self) -> torch.Tensor:
        return self.format.dequantize(self.stored(), self.shape)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads ``module.weight``."""
        return self.dequantize()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.owned_by_kernel:
            for k, v in self.kernel.stored().items():
                destination[prefix + k] = v

    def _load_from_state_dict(self, *args, **kwargs):
        self.use_kernel(None)  # new values: the kernel's copy would be stale
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and not (torch.is_grad_enabled() and x.requires_grad):
            return self.kernel(x)
        stored = self.stored()
        if torch.is_grad_enabled() and any(t.requires_grad for t in stored.values()) or self.kernel is not None:
            return self.format.linear(x, stored, self.shape, self.bias)
        if not self.cache_dequantized:
            return nn.functional.linear(x, self.dequantize().to(device=x.device, dtype=x.dtype), self.bias)
        if self._cache is None or self._cache.dtype != x.dtype or self._cache.device != x.device:
            self._cache = self.dequantize().to(device=x.device, dtype=x.dtype)
        return nn.functional.linear(x, self._cache, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format.name}, " \
               f"params={self.format.to_dict()}, kernel={self.kernel_name}"
