"""Refiners ``blockwise`` and ``global``: train the quantized model's format parameters
against the fp teacher, after the pivot checkpoint.

Both open every QuantLinear with :mod:`onecomp.training` (the format says which fields are
continuous and which are discrete; discrete ones train through a straight-through estimator),
so neither knows any format. Both keep the best state seen on their own objective,
including the starting one: a stage never leaves a block or the model worse than it found it.
"""

from __future__ import annotations

import time

import attrs
import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import BlockInputs, first_block_inputs, propagate_, run_block
from ..checkpoint import BlockStore, quantized_modules
from ..components import Refiner
from ..config import in_range, one_of
from ..errors import ConfigError
from ..hookspecs import hookimpl
from ..training import close, open_for_training, params_by_kind, select


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


@attrs.define
class BlockwiseConfig(TrainConfig):
    # tuned on the GPTQ 3-bit pivot of the embedded model (docs/refiners.md, "Step sizes")
    lr: float = attrs.field(default=5e-3, validator=in_range(0, 1))
    lr_discrete: float = attrs.field(default=2e-2, validator=in_range(0, 1))
    #: "block": ‖Ŷ − Y‖²/‖Y‖²; "token": the mean of every token's error relative to its own norm, so
    #: the attention-sink tokens (~100× the median norm) weigh like any other (docs/refiners.md)
    normalize: str = attrs.field(default="block", validator=one_of("block", "token"))


@attrs.define
class GlobalConfig(TrainConfig):
    epochs: int = attrs.field(default=5, validator=in_range(1, 10_000))


class _Trainer:
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


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def _subset(windows: torch.Tensor, samples: int) -> torch.Tensor:
    return windows[:samples] if samples else windows


def _slice(value, i: int, j: int, batch: int):
    """Rows i:j of a per-batch block kwarg (tensors or tuples of tensors with a batch dimension)."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch and batch > 1:
        return value[i:j]
    if isinstance(value, tuple):
        return tuple(_slice(v, i, j, batch) for v in value)
    return value


def _chunks(inputs: BlockInputs, size: int) -> BlockInputs:
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


def _reg_reports(regularizers) -> dict:
    return {reg.name: reg.report() for reg in regularizers}


class Blockwise(Refiner):
    """Per transformer block: minimise ‖block_q(X̂) − block_fp(X)‖² over the format's parameters."""

    name = "blockwise"
    Config = BlockwiseConfig
    scope = "block"

    def refine_block(self, ctx) -> dict:
        cfg = self.config
        model, teacher = ctx.model, ctx.teacher
        model.eval(), teacher.eval()
        _freeze(model), _freeze(teacher)
        path = ctx.inspection.blocks_path
        blocks, t_blocks = model.get_submodule(path), teacher.get_submodule(path)
        windows = _subset(ctx.windows, cfg.samples)
        q_in = first_block_inputs(model, blocks, windows, ctx.batch_size)
        fp_in = first_block_inputs(teacher, t_blocks, windows, ctx.batch_size)
        store = BlockStore(ctx.work_dir)
        rows = []
        bar = tqdm(total=len(blocks) * cfg.epochs, desc="blockwise", unit="epoch", disable=not ctx.progress)
        for b in range(len(blocks)):
            fp_out = propagate_(t_blocks[b], fp_in)  # fp_in is not needed after this
            if store.has(b):  # resume: re-apply the refined block
                rows.append(store.apply(b, model, ctx.registry))
                bar.update(cfg.epochs)
            else:
                row = self._train_block(b, blocks[b], q_in, fp_out, ctx, bar, f"{path}.{b}.")
                store.save(b, {f"{path}.{b}.{n}": m for n, m in quantized_modules(blocks[b]).items()}, row)
                rows.append(row)
            q_in, fp_in = propagate_(blocks[b], q_in), fp_out
        bar.close()
        before = sum(r["loss_before"] for r in rows)
        after = sum(r["loss_after"] for r in rows)
        return {"objective": f"relative block-output MSE ({cfg.normalize}-normalized), summed over blocks",
                "loss_before": before,
                "loss_after": after, "blocks": rows, "regularizers": _reg_reports(ctx.regularizers)}

    def _train_block(self, b, block, q_in: BlockInputs, target: BlockInputs, ctx, bar, prefix) -> dict:
        cfg = self.config
        t0 = time.perf_counter()
        weights = token_weights(target.hidden, cfg.normalize)

        def error(out, y, w) -> torch.Tensor:
            return ((out - y).square().sum(-1) * w).sum()

        def objective() -> float:
            with torch.no_grad():
                return sum(float(error(run_block(block, h, kw), y, w))
                           for h, kw, y, w in zip(q_in.hidden, q_in.kwargs, target.hidden, weights))

        opened = open_for_training(block, cfg.discrete)
        if not opened:
            return {"block": b, "loss_before": 0.0, "loss_after": 0.0, "best_epoch": 0, "epochs": [], "seconds": 0.0}
        trainer = _Trainer(opened, prefix, cfg, ctx.regularizers)
        train_in, train_target = _chunks(q_in, cfg.batch_size), _chunks(target, cfg.batch_size)
        train_weights = token_weights(train_target.hidden, cfg.normalize, like=target.hidden)
        n_batches = len(train_in.hidden)

        def loss(i):
            out = run_block(block, train_in.hidden[i], train_in.kwargs[i])
            return error(out, train_target.hidden[i], train_weights[i]) * n_batches

        def on_epoch(epoch, start, value, best):
            bar.set_postfix_str(f"block {b} loss {start:.3e} → {best:.3e}")
            bar.update(1)

        row = trainer.fit(loss, n_batches, cfg.epochs, objective, ctx.seed + b, on_epoch)
        close(block, opened)
        return {"block": b, **row, "seconds": time.perf_counter() - t0}


class Global(Refiner):
    """The whole quantized model distilled to the fp model: KL(p_fp ‖ p_q) on next-token logits."""

    name = "global"
    Config = GlobalConfig
    scope = "model"

    def refine_model(self, ctx) -> dict:
        cfg = self.config
        model, teacher = ctx.model, ctx.teacher
        model.eval(), teacher.eval()
        _freeze(model), _freeze(teacher)
        batches = list(_subset(ctx.windows, cfg.samples).split(cfg.batch_size))
        t0 = time.perf_counter()

        def kl(ids) -> torch.Tensor:
            with torch.no_grad():
                p_log = torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), -1)
            q_log = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
            return (p_log.exp() * (p_log - q_log)).sum(-1).mean()

        def objective() -> float:
            with torch.no_grad():
                return sum(float(kl(ids)) for ids in batches) / len(batches)

        opened = open_for_training(model, cfg.discrete)
        trainer = _Trainer(opened, "", cfg, ctx.regularizers)
        bar = tqdm(total=cfg.epochs * len(batches), desc="global", unit="batch", disable=not ctx.progress)

        def loss(i):
            bar.update(1)
            return kl(batches[i])

        def on_epoch(epoch, start, value, best):
            bar.set_postfix_str(f"epoch {epoch} KL {start:.4f} → {value:.4f} (best {best:.4f})")

        row = trainer.fit(loss, len(batches), cfg.epochs, objective, ctx.seed, on_epoch)
        bar.close()
        close(model, opened)
        return {"objective": "mean token KL(fp ‖ quantized)", **row, "seconds": time.perf_counter() - t0,
                "regularizers": _reg_reports(ctx.regularizers)}


@hookimpl
def register_refiners(register):
    register(Blockwise)
    register(Global)

