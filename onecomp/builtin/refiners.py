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
from tqdm.auto import tqdm

from ..calibration import BlockInputs, first_block_inputs, propagate_, run_block
from ..checkpoint import BlockStore, quantized_modules
from ..components import Refiner
from ..hookspecs import hookimpl
from ..training import (TrainConfig, Trainer, close, first_windows, freeze, open_for_training, regroup,
                        token_weights)
from ..validation import in_range, one_of


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
        freeze(model), freeze(teacher)
        path = ctx.inspection.blocks_path
        blocks, t_blocks = model.get_submodule(path), teacher.get_submodule(path)
        windows = first_windows(ctx.windows, cfg.samples)
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
        trainer = Trainer(opened, prefix, cfg, ctx.regularizers)
        train_in, train_target = regroup(q_in, cfg.batch_size), regroup(target, cfg.batch_size)
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
        freeze(model), freeze(teacher)
        batches = list(first_windows(ctx.windows, cfg.samples).split(cfg.batch_size))
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
        trainer = Trainer(opened, "", cfg, ctx.regularizers)
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

