"""Open quantized layers for training, format-agnostically: what training refiners build on.

A :class:`TrainableLinear` takes a :class:`~onecomp.checkpoint.QuantLinear` apart into its
format's logical fields. Fields named in ``Format.trainable`` become float parameters;
fields named in ``Format.discrete`` become float *latents* whose forward value is
``snap(latent)`` with a straight-through gradient. ``commit()`` snaps, packs and returns a
new QuantLinear, so the stored format never changes. No refiner needs format-specific code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .checkpoint import QuantLinear

KINDS = ("continuous", "sign", "integer")


def straight_through(x: torch.Tensor, snapped: torch.Tensor) -> torch.Tensor:
    """``snapped`` in the forward pass, the identity's gradient in the backward pass."""
    return x + (snapped - x).detach()


class TrainableLinear(nn.Module):
    """A QuantLinear opened for training; ``commit()`` closes it into a QuantLinear again."""

    def __init__(self, layer: QuantLinear, discrete: bool = True):
        super().__init__()
        self.format = layer.format
        self.shape = layer.shape
        fields = self.format.unpack(layer.stored(), layer.shape)
        self.dtypes = {k: v.dtype for k, v in fields.items()}
        trainable = set(type(self.format).trainable)
        latent = set(type(self.format).discrete) if discrete else set()
        self.kinds = {k: "continuous" for k in trainable} | {k: type(self.format).discrete[k] for k in latent}
        self.frozen = {k: v for k, v in fields.items() if k not in self.kinds}
        self.params = nn.ParameterDict()
        for k in sorted(self.kinds):
            start = self.format.latent_init(k, fields) if k in latent else fields[k].detach().float()
            self.params[k] = nn.Parameter(start.clone())
        self.bias = layer.bias

    def fields(self, straight: bool = True) -> dict[str, torch.Tensor]:
        """The logical fields as the forward pass sees them: latents snapped, floats in their stored dtype."""
        out = dict(self.frozen)
        for k, p in self.params.items():
            # continuous fields are rounded to their stored dtype, so training sees what is stored
            snapped = p.to(self.dtypes[k]).to(p.dtype) if self.kinds[k] == "continuous" else self.format.snap(k, p)
            out[k] = straight_through(p, snapped) if straight else snapped
        return out

    def weight(self) -> torch.Tensor:
        return self.format.dequantize_fields(self.fields(), self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def commit(self) -> QuantLinear:
        """Snap the latents, cast every field back to its stored dtype, pack: a QuantLinear."""
        fields = self.fields(straight=False)
        fields = {k: v.detach().to(self.dtypes[k]) for k, v in fields.items()}
        return QuantLinear(self.format, self.shape, self.format.pack(fields, self.shape), self.bias)

    def named_by_kind(self, prefix: str) -> dict[str, dict[str, nn.Parameter]]:
        """``{kind: {"<prefix>.<field>": parameter}}`` for the optimizer and the regularizers."""
        out: dict[str, dict[str, nn.Parameter]] = {k: {} for k in KINDS}
        for k, p in self.params.items():
            out[self.kinds[k]][f"{prefix}.{k}"] = p
        return out


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def open_for_training(root: nn.Module, discrete: bool = True, names: Iterable[str] | None = None
                      ) -> dict[str, TrainableLinear]:
    """Replace every QuantLinear under ``root`` (or those in ``names``) with a TrainableLinear."""
    chosen = {n: m for n, m in root.named_modules() if isinstance(m, QuantLinear)}
    if names is not None:
        chosen = {n: chosen[n] for n in names}
    opened = {}
    for name, layer in chosen.items():
        opened[name] = TrainableLinear(layer, discrete)
        _replace(root, name, opened[name])
    return opened


def close(root: nn.Module, opened: Mapping[str, TrainableLinear]) -> None:
    """Commit every TrainableLinear back into a QuantLinear, in place."""
    for name, layer in opened.items():
        _replace(root, name, layer.commit())


def params_by_kind(opened: Mapping[str, TrainableLinear], prefix: str = "") -> dict[str, dict[str, nn.Parameter]]:
    """All trained tensors of ``opened`` grouped by kind (continuous / sign / integer)."""
    out: dict[str, dict[str, nn.Parameter]] = {k: {} for k in KINDS}
    for name, layer in opened.items():
        for kind, d in layer.named_by_kind(prefix + name).items():
            out[kind].update(d)
    return out


def select(by_kind: Mapping[str, Mapping[str, torch.Tensor]], targets: str) -> dict[str, torch.Tensor]:
    """The tensors a regularizer with ``targets`` ('all' or a kind) should see."""
    if targets == "all":
        return {k: v for d in by_kind.values() for k, v in d.items()}
    return dict(by_kind.get(targets, {}))
