"""The training engine that block- and model-scope refiners build on, format-agnostically.

* :func:`open_for_training` takes every QuantLinear apart into its format's logical fields:
  fields in ``Format.trainable`` become float parameters, fields in ``Format.discrete`` float
  *latents* whose forward value is ``snap(latent)`` with a straight-through gradient;
  :func:`close` snaps, packs and puts QuantLinears back, so the stored format never changes.
* :class:`Trainer` is Adam with one step size per tensor, regularizer callbacks, and
  ``fit``, which keeps the best state seen on the refiner's own objective (the start included).
* :class:`TrainConfig` holds the shared knobs; :func:`token_weights` and :func:`regroup`
  build a block objective over calibration batches.

A refiner trains in a few lines::

    opened = open_for_training(block)
    trainer = Trainer(opened, prefix, self.config, ctx.regularizers)
    result = trainer.fit(loss, n_batches, self.config.epochs, objective, seed, on_epoch)
    close(block, opened)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs
import torch
from torch import nn

from .calibration import BlockInputs
from .checkpoint import QuantLinear
from .components import replace_module
from .errors import ConfigError
from .validation import in_range, one_of

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


def open_for_training(root: nn.Module, discrete: bool = True, names: Iterable[str] | None = None
                      ) -> dict[str, TrainableLinear]:
    """Replace every QuantLinear under ``root`` (or those in ``names``) with a TrainableLinear."""
    chosen = {n: m for n, m in root.named_modules() if isinstance(m, QuantLinear)}
    if names is not None:
        chosen = {n: chosen[n] for n in names}
    opened = {}
    for name, layer in chosen.items():
        opened[name] = TrainableLinear(layer, discrete)
        replace_module(root, name, opened[name])
    return opened


def close(root: nn.Module, opened: Mapping[str, TrainableLinear]) -> None:
    """Commit every TrainableLinear back into a QuantLinear, in place."""
    for name, layer in opened.items():
        replace_module(root, name, layer.commit())


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


# ---------------------------------------------------------------- the training engine


def _samples(inst, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(attribute.name, f"must be 0 (all calibration windows) or a positive integer, got {value!r}")


@attrs.define
class TrainConfig:
    lr: float = attrs.field(default=1e-3, validator=in_range(0, 1))  # 0: continuous fields stay
    epochs: int = attrs.field(default=10, validator=in_range(1, 10_000))
    #: train the format's discrete fields (codes, signs) through a straight-through estimator
    discrete: bool = True
    #: step of discrete latents: integer codes in code units, signs relative to the latent's RMS
    lr_discrete: float = attrs.field(default=1e-3, validator=in_range(0, 1))
    #: how many codes an integer field may move from its starting value (0: no limit)
    code_steps: int = attrs.field(default=1, validator=in_range(0, 1 << 30))
    #: step size over the stage: "linear" decays to 0 at the last step, "constant" keeps it
    schedule: str = attrs.field(default="linear", validator=one_of("linear", "constant"))
    #: use only the first N calibration windows (0: all)
    samples: int = attrs.field(default=0, validator=_samples)
    #: calibration windows per optimizer step
    batch_size: int = attrs.field(default=2, validator=in_range(1, 4096))
    regularizers: list = attrs.Factory(list)


class Trainer:
    """Adam over the opened layers, one param group per tensor: float fields and sign latents step
    by ``lr × RMS(tensor)`` (every tensor moves by about the same fraction of its size), integer
    latents by ``lr_discrete`` codes and stay within ``code_steps`` codes of their start (AutoRound's
    search space: Adam moves all latents at one rate, so unbounded codes flip together and jump)."""

    def __init__(self, opened: dict, prefix: str, cfg: TrainConfig, regularizers: list):
        self.by_kind = params_by_kind(opened, prefix)
        self.regularizers = regularizers
        self.schedule = cfg.schedule
        for reg in regularizers:  # first: init may move the tensors (gap initialisation)
            reg.init(select(self.by_kind, reg.targets))
        groups, self.bounds = [], []
        for kind, params in self.by_kind.items():
            for p in params.values():
                if kind == "integer":
                    rate = cfg.lr_discrete
                    if cfg.code_steps:  # latents round to at most code_steps codes away
                        radius = cfg.code_steps + 0.49
                        self.bounds.append((p, p.detach() - radius, p.detach() + radius))
                else:
                    rms = float(p.detach().square().mean().sqrt()) if p.numel() else 0.0
                    rate = (cfg.lr if kind == "continuous" else cfg.lr_discrete) * rms
                if rate > 0:
                    groups.append({"params": [p], "lr": rate})
        self.params = [p for d in self.by_kind.values() for p in d.values()]
        self.optimizer = torch.optim.Adam(groups) if groups else None

    def penalty(self) -> torch.Tensor:
        total = torch.zeros(())
        for reg in self.regularizers:
            total = total + reg.penalty(select(self.by_kind, reg.targets))
        return total

    def step(self, loss: torch.Tensor) -> None:
        if self.optimizer is None:
            return
        self.optimizer.zero_grad(set_to_none=True)
        (loss + self.penalty()).backward()
        self.optimizer.step()
        with torch.no_grad():
            for p, lo, hi in self.bounds:
                torch.clamp(p, lo, hi, out=p)
        for reg in self.regularizers:
            reg.step(select(self.by_kind, reg.targets))

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def restore(self, state: list[torch.Tensor]) -> None:
        for p, v in zip(self.params, state):
            p.copy_(v)

    def finish(self) -> None:
        for reg in self.regularizers:
            reg.finish(select(self.by_kind, reg.targets))

    def fit(self, loss, n_batches: int, epochs: int, objective, seed: int, on_epoch) -> dict:
        """Epochs of shuffled steps on ``loss(i)``; ``objective()`` before and after every epoch;
        the best state seen, the start included, is restored before the regularizers finish."""
        start = objective()
        best, best_epoch, best_state = start, 0, self.snapshot()
        history = []
        gen = torch.Generator().manual_seed(seed)
        groups = self.optimizer.param_groups if self.optimizer and self.schedule == "linear" else []
        base = [g["lr"] for g in groups]
        total, done = epochs * n_batches, 0
        for epoch in range(1, epochs + 1):
            for i in torch.randperm(n_batches, generator=gen).tolist():
                for g, lr in zip(groups, base):  # linear: the step size falls to 0 at the last step
                    g["lr"] = lr * (1 - done / total)
                self.step(loss(i))
                done += 1
            value = objective()
            history.append(value)
            if value < best:
                best, best_epoch, best_state = value, epoch, self.snapshot()
            on_epoch(epoch, start, value, best)
        self.restore(best_state)
        self.finish()
        return {"loss_before": start, "loss_after": best, "best_epoch": best_epoch, "epochs": history}


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def first_windows(windows: torch.Tensor, samples: int) -> torch.Tensor:
    return windows[:samples] if samples else windows


def _slice(value, i: int, j: int, batch: int):
    """Rows i:j of a per-batch block kwarg (tensors or tuples of tensors with a batch dimension)."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch and batch > 1:
        return value[i:j]
    if isinstance(value, tuple):
        return tuple(_slice(v, i, j, batch) for v in value)
    return value


def regroup(inputs: BlockInputs, size: int) -> BlockInputs:
    """The same windows regrouped into batches of at most ``size`` (kwargs sliced alongside)."""
    hidden, kwargs = [], []
    for h, kw in zip(inputs.hidden, inputs.kwargs):
        B = h.shape[0]
        for i in range(0, B, size):
            hidden.append(h[i:i + size])
            kwargs.append({k: _slice(v, i, i + size, B) for k, v in kw.items()})
    return BlockInputs(hidden, kwargs)


def token_weights(targets: list, normalize: str, like: list | None = None) -> list:
    """Weights ``w_t`` per token of each target batch, so the block objective is ``Σ_t w_t ‖ŷ_t − y_t‖²``:
    "token" gives the mean of every token's relative error ``‖ŷ_t − y_t‖²/‖y_t‖²``, "block" gives
    ``‖Ŷ − Y‖²/‖Y‖²``. Token count and ‖Y‖² come from ``like`` (default: ``targets``), so a
    regrouping of the same windows into other batches keeps the weights of the whole."""
    ref = [y.detach().float().square().sum(-1) for y in (like if like is not None else targets)]
    n = sum(t.numel() for t in ref)
    mean_sq = max(sum(float(t.sum()) for t in ref) / n, 1e-30)
    out = []
    for y in targets:
        sq = y.detach().float().square().sum(-1)
        out.append((1 / sq.clamp_min(1e-12) if normalize == "token" else torch.full_like(sq, 1 / mean_sq)) / n)
    return out
