"""The layer-wise stage: block by block, capture → layer refiners → quantizer → QuantLinear.

Each finished block is saved to ``<out>/.work/NN-layerwise/`` so that a crash loses nothing:
on resume, saved blocks are re-applied and only the activations are recomputed.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import attrs
import torch
from tqdm.auto import tqdm

from .. import distributed
from ..calibration import BlockInputs, SequentialCapture, capture_block, first_block_inputs, propagate_, stages_supported
from ..checkpoint import BlockStore, QuantLinear
from ..components import BlockReport, LayerReport, LayerStats, LayerTask, replace_module, stored_bits


@attrs.define
class LayerwiseContext:
    model: torch.nn.Module
    inspection: object
    plan: dict  # full linear name -> ComponentSpec of its quantizer
    refiners: list  # layer-scope refiner instances
    registry: object
    windows: torch.Tensor
    batch_size: int
    work_dir: Path
    seed: int = 0
    progress: bool = True
    run_info: object = None
    sequential: str = "layer"  # see CalibrationSection.sequential
    keep_mb: float = 512  # see CalibrationSection.keep_mb
    files: object = None  # WeightFiles: the blocks are on disk and read one at a time (model.stream)
    device: object = "cpu"  # where a streamed block is loaded


def _key(spec) -> str:
    return json.dumps(spec.to_dict(), sort_keys=True, default=str)


def _cache_over_weight(model, linear, W_hat: torch.Tensor) -> torch.Tensor:
    """The QuantLinear's dequantized-weight cache, written over the replaced layer's own weight.

    The fp weight is not needed again, and keeping it beside a second, dequantized copy would double
    the linear layers' memory: transformers memory-maps checkpoints privately, and a weight's pages stay
    resident while any tensor of that file lives. Only done when no other parameter or buffer shares
    the weight's storage (tied weights keep their values)."""
    weight = linear.weight.data
    storage = weight.untyped_storage().data_ptr()
    holders = sum(t.untyped_storage().data_ptr() == storage
                  for t in [*(p for _, p in model.named_parameters(remove_duplicate=False)), *model.buffers()])
    if holders > 1 or weight.shape != W_hat.shape or weight.device != W_hat.device or not weight.is_contiguous():
        return W_hat.to(weight.dtype)
    return weight.copy_(W_hat)


def relative_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor | None) -> float:
    """‖(W − Ŵ)X‖² / ‖WX‖² from the Hessian when there is one, else the plain weight error."""
    E = W - W_hat
    if H is None:
        return float(E.square().sum() / W.square().sum().clamp(min=1e-30))
    return float(((E @ H) * E).sum() / ((W @ H) * W).sum().clamp(min=1e-30))


def run_layerwise(ctx: LayerwiseContext) -> dict:
    """Quantize every planned linear layer, block by block; returns per-layer reports."""
    model, insp, registry = ctx.model, ctx.inspection, ctx.registry
    blocks = model.get_submodule(insp.blocks_path)
    quantizers = {}  # one instance per distinct quantizer spec
    for spec in ctx.plan.values():
        if _key(spec) not in quantizers:
            quantizers[_key(spec)] = registry.create(spec)
    store = BlockStore(ctx.work_dir) if distributed.is_main() else None  # rank 0 alone writes
    need_fp = any("cross" in c.needs for c in [*quantizers.values(), *ctx.refiners])

    if not need_fp and not any(q.needs for q in quantizers.values()) and not any(r.needs for r in ctx.refiners):
        return _quantize_without_data(ctx, quantizers, store)  # e.g. RTN: no activations at all
    q_in = first_block_inputs(model, blocks, _my_windows(ctx.windows, ctx.batch_size), ctx.batch_size)
    fp_in = q_in.clone() if need_fp else None
    _release_outside_blocks(ctx)
    reports: list[LayerReport] = []
    bar = tqdm(total=len(blocks), desc="layer-wise", unit="block", disable=not ctx.progress)
    for b, info in enumerate(insp.blocks):
        block = blocks[b]
        t0 = time.perf_counter()
        last = b == len(insp.blocks) - 1  # no next block: its outputs are never needed
        _fetch(ctx, info)
        if _has(store, b):  # resume: re-apply, recompute activations only
            if fp_in is not None and not last:
                fp_in = propagate_(block, fp_in)
            reports += _apply_saved(ctx, store, b)
            if not last:
                q_in = propagate_(block, q_in)
            _release(ctx, block)
            bar.update(1)
            continue

        staged = ctx.sequential == "layer" and stages_supported(block, info.groups)
        layer_reports, fp_out, q_out = _quantize_block(ctx, b, info, block, quantizers, q_in, fp_in, staged, last)
        if store is not None:
            done = {r.name: model.get_submodule(r.name) for r in layer_reports}
            store.save(b, done, {"layers": [attrs.asdict(r) for r in layer_reports]})
        reports += layer_reports
        if not last:
            q_in = q_out if q_out is not None else propagate_(block, q_in)
        fp_in = fp_out
        _release(ctx, block)
        if ctx.run_info is not None:
            registry.hook.on_block_done(run=ctx.run_info,
                                        block=BlockReport(b, time.perf_counter() - t0, layer_reports))
        worst = max((r.rel_error or 0 for r in layer_reports), default=0)
        bar.set_postfix_str(f"max rel err {worst:.2e}")
        bar.update(1)
    bar.close()
    _reassemble(ctx, store)
    return {"layers": [attrs.asdict(r) for r in reports]}


def _quantize_without_data(ctx, quantizers, store) -> dict:
    """Data-free quantizers: no calibration forward passes, block by block with resume."""
    blocks = ctx.model.get_submodule(ctx.inspection.blocks_path)
    reports = []
    _release_outside_blocks(ctx)
    for b, info in enumerate(tqdm(ctx.inspection.blocks, desc="layer-wise", unit="block", disable=not ctx.progress)):
        if _has(store, b):
            if ctx.files is None:
                reports += _apply_saved(ctx, store, b)
            else:  # put back at the end by _reassemble
                notes = distributed.from_main(lambda: store.load(b, ctx.registry)[1])
                reports += [LayerReport(**r) for r in notes["layers"]]
            continue
        t0 = time.perf_counter()
        _fetch(ctx, info)
        layer_reports, _, _ = _quantize_block(ctx, b, info, blocks[b], quantizers, None, None)
        if store is not None:
            store.save(b, {r.name: ctx.model.get_submodule(r.name) for r in layer_reports},
                       {"layers": [attrs.asdict(r) for r in layer_reports]})
        _release(ctx, blocks[b])
        reports += layer_reports
        if ctx.run_info is not None:
            ctx.registry.hook.on_block_done(run=ctx.run_info,
                                            block=BlockReport(b, time.perf_counter() - t0, layer_reports))
    _reassemble(ctx, store)
    return {"layers": [attrs.asdict(r) for r in reports]}


def _fetch(ctx, info) -> None:
    """Streaming: read one decoder block's weights from the model's files onto the device."""
    if ctx.files is not None:
        from ..models.lazy import load_params_

        load_params_(ctx.model, info.prefix, ctx.files, ctx.device, _dtype(ctx.model))


def _release(ctx, block) -> None:
    """Streaming: the finished block (saved in the block store) leaves memory."""
    if ctx.files is not None:
        from ..models.lazy import release_

        release_(block)


def _release_outside_blocks(ctx) -> None:
    """Streaming: the embeddings and the head leave memory while the blocks are quantized (none needs them)."""
    if ctx.files is not None:
        from ..models.lazy import release_outside_blocks_

        release_outside_blocks_(ctx.model)


def _reassemble(ctx, store) -> None:
    """Streaming: the quantized model for the checkpoint, block by block from the block store: the
    stored tensors of its QuantLinears (no dequantized copy kept) and its other weights from the files.
    Rank 0 alone, which writes the checkpoint; the other processes are done."""
    if ctx.files is None or store is None:
        return
    from ..models.lazy import load_outside_blocks_

    dtype = _dtype(ctx.model)
    load_outside_blocks_(ctx.model, ctx.files, ctx.device, dtype)
    for b, info in enumerate(ctx.inspection.blocks):
        saved, _ = store.load(b, ctx.registry)
        for name, (fmt, shape, stored) in saved.items():  # QuantLinears first: their fp weights are never read
            bias = ctx.files.get(f"{name}.bias").to(dtype) if f"{name}.bias" in ctx.files else None
            replace_module(ctx.model, name, QuantLinear(fmt, shape, stored, bias, cache_dequantized=False).to(ctx.device))
        _fetch(ctx, info)


def _dtype(model) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)


def _my_windows(windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """This process's calibration windows: a contiguous share of whole batches, so that every batch is
    the same as in a single-process run (and so are its activations, bit for bit)."""
    if not distributed.active():
        return windows
    batches = windows.split(batch_size)
    mine = distributed.shard(len(batches))
    return torch.cat(batches[mine.start:mine.stop])


def _has(store, b: int) -> bool:
    """Whether block ``b`` was finished by an earlier session (rank 0's store decides for everyone)."""
    return distributed.broadcast(store.has(b) if store is not None else None)


def _apply_saved(ctx, store, b) -> list:
    """Put a saved block's QuantLinears into the model; rank 0 reads them and sends them to the others."""
    saved, notes = distributed.broadcast(store.load(b, ctx.registry) if store is not None else None)
    for name, (fmt, shape, stored) in saved.items():
        old = ctx.model.get_submodule(name)
        replace_module(ctx.model, name, QuantLinear(fmt, shape, stored, getattr(old, "bias", None)))
    return [LayerReport(**r) for r in notes["layers"]]


def _quantize_layer(ctx, quantizer, full: str, linear, group_stats, group: str):
    """One layer's compressed weight, its relative output error, the seconds it took, and Ŵ."""
    t0 = time.perf_counter()
    W = linear.weight.detach().to(torch.float32, copy=True)  # the task's own: the weight is overwritten by Ŵ
    task = LayerTask(name=full, W=W, stats=group_stats if group_stats is not None else LayerStats(),
                     bias=linear.bias, group=group, seed=ctx.seed)
    for r in ctx.refiners:
        if r.applies_to(full):
            task = r.adjust(task)
    compressed = quantizer.quantize(task)
    compressed.format.check(compressed.tensors, compressed.shape)
    W_hat = QuantLinear.from_compressed(compressed, linear.bias).dequantize()
    return compressed, relative_error(W, W_hat, task.stats.H), time.perf_counter() - t0, W_hat


def _quantize_block(ctx, b, info, block, quantizers, q_in: BlockInputs | None, fp_in: BlockInputs | None,
                    staged: bool = False, last: bool = False):
    """Quantize one block's planned layers; returns (reports, fp-path outputs, quantized-path outputs).

    ``staged``: calibrate group by group with ``SequentialCapture``, which also yields the block's
    outputs on the quantized path (None otherwise, or for the ``last`` block: nothing reads them)."""
    registry = ctx.registry
    planned = {rel: ctx.plan[f"{info.prefix}.{rel}"] for rel in info.linears if f"{info.prefix}.{rel}" in ctx.plan}
    leaders, needs = {}, {}
    for group in info.groups:
        members = [rel for rel in group if rel in planned]
        if not members:
            continue
        want = set()
        for rel in members:
            want |= set(quantizers[_key(planned[rel])].needs)
            full = f"{info.prefix}.{rel}"
            for r in ctx.refiners:
                if r.applies_to(full):
                    want |= set(r.needs)
        leaders[group[0]] = block.get_submodule(group[0])
        needs[group[0]] = want
    if staged:  # the fp path (for `cross`) runs an unquantized copy of the block, taken before any layer is replaced
        fp_block = copy.deepcopy(block) if fp_in is not None else None
        sequential = SequentialCapture(block, q_in, ctx.keep_mb, fp_block, fp_in)
        stats, fp_out = {}, None
    else:
        stats, fp_out = capture_block(block, leaders, q_in, fp_in, needs) if q_in is not None else ({}, None)

    reports, turn = [], 0
    for group in info.groups:
        if staged:
            stats[group[0]] = sequential.stats(group[0], needs.get(group[0], ()))
        members = [rel for rel in group if rel in planned]
        # data-parallel: the layers take turns over the processes; each quantizes its own, then sends them
        owners = {rel: (turn + k) % distributed.world_size() for k, rel in enumerate(members)}
        turn += len(members)
        mine = {rel: _quantize_layer(ctx, quantizers[_key(planned[rel])], f"{info.prefix}.{rel}",
                                     block.get_submodule(rel), stats.get(group[0]), f"{info.prefix}.{group[0]}")
                for rel in members if owners[rel] == distributed.rank()}
        for rel in members:
            own = mine.get(rel)
            compressed, err, seconds = distributed.broadcast(own[:3] if own else None, src=owners[rel])
            full = f"{info.prefix}.{rel}"
            linear = block.get_submodule(rel)
            fmt = compressed.format
            registry.get("format", fmt.name)  # a format the checkpoint loader will find by name
            q = QuantLinear.from_compressed(compressed, linear.bias)
            W_hat = own[3] if own else q.dequantize()
            q._cache = _cache_over_weight(ctx.model, linear, W_hat)  # the first forward would compute the same
            replace_module(block, rel, q.to(linear.weight.device))
            rep = LayerReport(full, fmt.name, stored_bits(q.stored()) / linear.weight.numel(), err, seconds,
                              {k: v for k, v in compressed.info.items() if isinstance(v, (int, float, str))})
            reports.append(rep)
            if ctx.run_info is not None:
                registry.hook.on_layer_quantized(run=ctx.run_info, layer=rep)
    if staged and not last:  # the quantized path first: it also advances the fp path through groups nobody asked for
        q_out = sequential.finish()
        return reports, (sequential.fp.finish() if sequential.fp is not None else None), q_out
    return reports, fp_out, None
