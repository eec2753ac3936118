"""plan → layer-wise stage → pivot checkpoint → later stages → final report.

Output directory layout::

    <out>/run.json                 run state: config, fp perplexities, finished stages
    <out>/01-layerwise/            the pivot checkpoint (HF dir + model.safetensors + onecomp.json)
    <out>/02-<refiner>/            one checkpoint per later stage
    <out>/reports/NN-<stage>.{json,md}
    <out>/report.{json,md}         the whole run
    <out>/.work/                   per-block progress of the running stage (removed when it ends)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import attrs
import torch

from .. import distributed
from ..calibration import calibration_windows
from ..checkpoint import bits_summary, save_checkpoint
from ..config import PipelineConfig, load_config
from ..errors import RunError
from ..evaluation import eval_windows, perplexity
from ..models import inspect_model, load_model
from ..registry import Registry
from .layerwise import LayerwiseContext, run_layerwise
from ..components import STATISTICS, CheckpointInfo, RunInfo, StageContext, StageInfo, StageReport
from .report import PeakMemory, Timer, run_markdown, stage_markdown, write_json

log = logging.getLogger("onecomp")


def _stage_dir(out: Path, index: int, name: str) -> Path:
    return out / f"{index:02d}-{name}"


def _same_run(old: dict, new: dict, ignore: tuple = ()) -> bool:
    """Configs equal but for ``output`` (a run directory may be moved or copied) and ``ignore``."""
    skip = ("output", *ignore)
    return {k: v for k, v in old.items() if k not in skip} == {k: v for k, v in new.items() if k not in skip}


def _extends(old: dict, new: dict, registry) -> bool:
    """True when ``new`` equals ``old`` except for block/model refiners appended after old's:
    the finished stages are then still valid and the run can go on with more stages."""
    if not _same_run(old, new, ("refiners",)):
        return False

    def split(config):
        layer, later = [], []
        for r in config.get("refiners", []):
            name = r if isinstance(r, str) else r.get("name")
            (layer if registry.get("refiner", name).scope == "layer" else later).append(r)
        return layer, later

    (old_layer, old_later), (new_layer, new_later) = split(old), split(new)
    return old_layer == new_layer and new_later[:len(old_later)] == old_later


LOCK = ".lock"


def _lock(out: Path) -> None:
    """Hold ``<out>/.lock`` (our pid) for the run: a second process on one directory is refused at once,
    naming the holder; a lock left by a dead process (or an earlier call in this one) is taken over."""
    path = out / LOCK
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
                pid, host = int(holder["pid"]), holder.get("host")
            except (OSError, ValueError, KeyError, TypeError):
                pid, host = None, None  # half-written: its writer died between create and write
            if pid is not None and pid != os.getpid() and host == socket.gethostname() and _alive(pid):
                raise RunError(f"output.dir: {out} is in use by another onecomp run (pid {pid}, lock file "
                               f"{path}, since {holder.get('since', '?')}); wait for it to end or choose another "
                               "output.dir")
            if pid is not None and host not in (None, socket.gethostname()):
                raise RunError(f"output.dir: {out} is locked by pid {pid} on host {host} ({path}); delete the "
                               "lock file if that run is over")
            log.info("taking over the stale lock %s (pid %s)", path, pid)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        return
    raise RunError(f"output.dir: cannot take the lock {path}; another run keeps creating it")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlock(out: Path) -> None:
    try:
        if json.loads((out / LOCK).read_text()).get("pid") == os.getpid():
            (out / LOCK).unlink()
    except (OSError, ValueError):
        pass


def _clean_partial(out: Path) -> None:
    """Remove what a killed process left half-written: ``.NAME.tmpPID``/``.NAME.oldPID`` checkpoint copies and
    JSON files, and unfinished per-block work files (the finished ones are complete: written, then renamed)."""
    for p in [*out.glob(".*.tmp*"), *out.glob(".*.old*"), *out.glob(".work/*/*.tmp")]:
        log.info("removing %s, left by an interrupted run", p)
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunError(f"{path}: cannot be read ({exc}); move the directory away or rerun with --force") from None
    if not isinstance(state, dict) or not isinstance(state.get("stages", []), list):
        raise RunError(f"{path}: is not a run state; move the directory away or rerun with --force")
    state.setdefault("before", {})
    state.setdefault("stages", [])
    return state


def _has_progress(out: Path, state: dict) -> bool:
    """A finished stage or a finished block: work that a new config would throw away."""
    return bool(state["stages"]) or any((out / ".work").glob("*/block-*.json"))


def _prepare_out(out: Path, config: dict, resume: bool, force: bool, registry) -> dict:
    if out.exists() and not out.is_dir():
        raise RunError(f"output.dir: {out} is a file; choose a directory (it is created if missing)")
    state_path = out / "run.json"
    if resume and not state_path.exists():
        raise RunError(f"nothing to resume: {out} holds no run ({state_path} does not exist); --resume continues "
                       "the run in the config's output.dir, so pass the same config (or --output DIR)")
    out.mkdir(parents=True, exist_ok=True)
    _lock(out)
    _clean_partial(out)
    if state_path.exists():
        state = _read_state(state_path)
        stopped = state.pop("stopped", None)
        same = _same_run(state.get("config", {}), config)
        if force:
            for p in out.iterdir():
                if p.name != LOCK:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        elif same or resume:
            if not same:
                if not _has_progress(out, state):
                    raise RunError(f"{out}: the run there stopped before finishing any block "
                                   f"({stopped or 'no reason recorded'}) and had another config; run without "
                                   "--resume to start this one")
                raise RunError(f"{out} holds a run with a different config; use another output.dir or --force")
            if stopped:
                log.info("resuming the run in %s, which stopped: %s", out, stopped)
            else:
                log.info("resuming the run in %s", out)
            state["config"] = config  # the directory may have been moved or copied
            return state
        elif _extends(state.get("config", {}), config, registry):
            log.info("extending the run in %s with more stages", out)
            state["config"] = config
            write_json(state_path, state)
            return state
        elif not _has_progress(out, state):  # an early failure (a typo in model.id) blocks nothing
            log.info("replacing the run in %s, which stopped before finishing any block (%s)", out, stopped)
        else:
            raise RunError(f"{out} holds a run with a different config; pass --force to start over "
                           "or choose another output.dir")
    state = {"config": config, "before": {}, "stages": []}
    write_json(state_path, state)
    return state


def _stopped(out: Path, exc: BaseException) -> None:
    """Record in run.json why a run stopped, so that a later --resume or a new config can say it."""
    state_path = out / "run.json"
    try:
        state = _read_state(state_path)
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        state["stopped"] = f"{reason} ({time.strftime('%Y-%m-%dT%H:%M:%S%z')})"[:500]
        write_json(state_path, state)
    except (OSError, RunError):
        pass  # a full disk: the original error says more


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def run(source=None, *, registry: Registry | None = None, resume: bool = False, force: bool = False,
        output: str | None = None, progress: bool = True) -> dict:
    """Run a whole pipeline and return the run report (also written to ``<out>/report.json``)."""
    registry = registry or Registry.default()
    cfg: PipelineConfig = load_config(source, registry)  # every name and value checked before any work
    if output:
        cfg.output.dir = output
    out = Path(cfg.output.dir)
    backend = registry.create(cfg.backend)
    device = backend.device()
    leader = _join(device)
    progress = progress and leader
    state = distributed.from_main(lambda: _prepare_out(out, cfg.raw, resume, force, registry))
    try:
        result = _run_in(cfg, registry, out, state, backend, device, leader, progress)
    except BaseException as exc:
        if leader:
            _stopped(out, exc)
        raise
    if leader:
        _unlock(out)
    return result


def _run_in(cfg: PipelineConfig, registry, out: Path, state: dict, backend, device, leader: bool,
            progress: bool) -> dict:
    """The body of ``run`` once its output directory is prepared and locked."""
    t_run = time.perf_counter()
    torch.manual_seed(cfg.seed)

    _say(f"loading {cfg.model.id} …", progress)
    files = None
    if cfg.model.stream:  # the decoder blocks stay on disk; the layer-wise stage reads them one at a time
        from ..models.lazy import inspect_streamed, open_streamed

        loaded, files = open_streamed(cfg.model.id, cfg.model.dtype, device, cfg.model.trust_remote_code)
        model, tok = loaded.model, loaded.tokenizer
        inspection = inspect_streamed(model, files, device)
    else:
        loaded = load_model(cfg.model.id, cfg.model.dtype, cfg.model.trust_remote_code)
        model, tok = loaded.model.to(device), loaded.tokenizer
        inspection = inspect_model(model)
    calib = calibration_windows(tok, cfg.calibration.corpus, cfg.calibration.samples, cfg.calibration.seq_len,
                                cfg.calibration.seed)
    t_plan = time.perf_counter()
    plan = make_plan(registry.create(cfg.planner), inspection, cfg, registry, model, calib, backend, progress)
    state["plan_seconds"] = time.perf_counter() - t_plan  # planning (and what it captures), not in any stage's time
    run_info = RunInfo(config=cfg.raw, out_dir=out, model=cfg.model.id,
                       plan={k: v.to_dict() for k, v in plan.items()})
    registry.hook.on_run_start(run=run_info)

    evals = {t: eval_windows(tok, t, cfg.evaluation.windows, cfg.evaluation.seq_len) for t in cfg.evaluation.texts}

    def evaluate(m, label):
        return {t: perplexity(m, w, cfg.evaluation.batch_size, progress, desc=f"ppl {t} ({label})")
                for t, w in evals.items()}

    if leader and cfg.evaluation.before and not state["before"] and files is None:  # streamed: never whole
        _say("evaluating the fp model …", progress)
        state["before"] = evaluate(model, "fp")
        state["before_bits"] = {"dense_bits_per_weight": torch.finfo(next(model.parameters()).dtype).bits}
        write_json(out / "run.json", state)

    stages = _stages(cfg, registry)
    finished = {s["name"]: s for s in state["stages"]}
    if leader:
        (out / "reports").mkdir(exist_ok=True)

    def teacher():
        if files is not None:  # streamed: the teacher's blocks are read from the files as they run
            from ..models.lazy import streamed_teacher

            return streamed_teacher(files.path, cfg.model.dtype, device, cfg.model.trust_remote_code)
        return load_model(cfg.model.id, cfg.model.dtype, cfg.model.trust_remote_code).model

    for stage in stages:
        name, index = stage.info.name, stage.info.index
        ckpt = _stage_dir(out, index, name)
        if stage.spec is not None and distributed.active():  # data-parallel: later stages run on rank 0 alone
            distributed.leave()
        if not leader and not distributed.active():
            break
        if distributed.from_main(lambda: name in finished and (ckpt / "onecomp.json").exists()):
            _say(f"stage {index} {name}: already done, loading {ckpt}", progress)
            from ..checkpoint import load

            if leader:  # the other processes have nothing more to do
                model = load(ckpt, registry).to(device)
            continue
        work = out / ".work" / f"{index:02d}-{name}"
        with Timer() as timer, PeakMemory() as mem:
            details = _run_stage(stage, model, inspection, plan, calib, cfg, registry, work, progress, run_info,
                                 teacher, (files, device))
        if not leader:
            continue
        bits = bits_summary(model)
        _say(f"stage {index} {name}: evaluating …", progress)
        ppl = evaluate(model, name)
        report = StageReport(name, index, stage.info.scope, str(ckpt), ppl, bits, timer.seconds, mem.peak_mb,
                             details)
        history = [s for s in state["stages"]] + [{k: v for k, v in report.to_dict().items() if k != "details"}]
        manifest = save_checkpoint(model, tok, ckpt, registry, base_model=cfg.model.id, config=cfg.raw,
                                   stages=history)
        registry.hook.on_checkpoint_written(run=run_info, checkpoint=CheckpointInfo(ckpt, manifest))
        write_json(out / "reports" / f"{index:02d}-{name}.json", report.to_dict())
        (out / "reports" / f"{index:02d}-{name}.md").write_text(stage_markdown(report, state["before"]))
        state["stages"] = history
        write_json(out / "run.json", state)
        shutil.rmtree(work, ignore_errors=True)
        registry.hook.on_stage_end(run=run_info, stage=stage.info, report=report)
        _say(stage_markdown(report, state["before"]), progress)

    distributed.leave()
    if not leader:
        return {"model": cfg.model.id, "output": str(out), "leader": False}  # rank 0 writes and reports
    total = time.perf_counter() - t_run
    result = {"model": cfg.model.id, "output": str(out), "before": state["before"], "stages": state["stages"],
              "plan_seconds": state.get("plan_seconds"), "seconds_this_session": total}
    for s in result["stages"]:
        s["bits"]["dense_bits_per_weight"] = state.get("before_bits", {}).get("dense_bits_per_weight")
    write_json(out / "report.json", result)
    md = run_markdown(cfg.model.id, state["before"], state["stages"], total)
    (out / "report.md").write_text(md)
    shutil.rmtree(out / ".work", ignore_errors=True)
    return result


def _join(device) -> bool:
    """Join the process group when started by torchrun; True for the process that writes (rank 0)."""
    if distributed.init_from_env(device):
        log.info("data-parallel calibration: rank %d of %d", distributed.rank(), distributed.world_size())
    return distributed.is_main()


def make_plan(planner, inspection, cfg: PipelineConfig, registry, model, windows: torch.Tensor, backend=None,
              progress: bool = False) -> dict:
    """The planner's plan; what it declares in ``needs`` is gathered first (statistics in one pass of
    ``windows`` through the fp ``model``, the backend's capabilities) and handed to ``plan``."""
    needs = set(planner.needs)
    given = {"model": model} if "model" in needs else {}
    statistics = needs & STATISTICS
    if statistics:
        _say(f"planner {planner.name}: capturing {', '.join(sorted(statistics))} …", progress)
        given["stats"] = planner_stats(model, inspection, windows, cfg.calibration.batch_size, statistics)
    if "windows" in needs:
        given["windows"] = windows
    if "capabilities" in needs:
        given["capabilities"] = (backend or registry.create(cfg.backend)).capabilities()
    plan = planner.plan(inspection, cfg.quantizer, registry, **given)
    if not plan:
        raise RunError("the plan selects no layer to quantize; check plan.planner's ignore list")
    return plan


@torch.no_grad()
def planner_stats(model, inspection, windows: torch.Tensor, batch_size: int, needs) -> dict:
    """``{linear name: LayerStats}`` of every decoder linear's input on the fp model, one collector per
    fused input group (its layers share the LayerStats)."""
    from ..calibration import StatsCollector

    blocks = model.get_submodule(inspection.blocks_path)
    collectors, handles = {}, []
    for info in inspection.blocks:
        for group in info.groups:
            leader = blocks[info.index].get_submodule(group[0])
            c = collectors[f"{info.prefix}.{group[0]}"] = StatsCollector(needs, leader.in_features)
            handles.append(leader.register_forward_pre_hook(lambda m, args, _c=c: _c.add(args[0])))

    class Done(Exception):
        pass

    def stop(m, args, out):  # after the last block: the head's logits are not needed
        raise Done

    handles.append(blocks[len(inspection.blocks) - 1].register_forward_hook(stop))
    device = next(model.parameters()).device
    starts = list(range(0, len(windows), batch_size))
    if distributed.active():  # data-parallel: each rank its share of the batches; the collectors sum across ranks
        starts = [starts[j] for j in distributed.shard(len(starts))]
    try:
        for i in starts:
            try:
                model(input_ids=windows[i:i + batch_size].to(device), use_cache=False)
            except Done:
                pass
    finally:
        for h in handles:
            h.remove()
    stats = {}
    for info in inspection.blocks:
        for group in info.groups:
            shared = collectors[f"{info.prefix}.{group[0]}"].finish()
            stats.update({f"{info.prefix}.{rel}": shared for rel in group})
    return stats


@attrs.define
class _Stage:
    info: StageInfo
    spec: object  # the refiner's ComponentSpec; None for the layer-wise stage
    regularizers: list  # the refiner's regularizers as ComponentSpecs


def _stages(cfg: PipelineConfig, registry) -> list[_Stage]:
    """The layer-wise stage, then one stage per block- or model-scope refiner, in config order."""
    stages = [_Stage(StageInfo("layerwise", "layer", 1), None, [])]
    for spec, regs in zip(cfg.refiners, cfg.regularizers):
        scope = registry.get("refiner", spec.name).scope
        if scope != "layer":
            stages.append(_Stage(StageInfo(spec.name, scope, len(stages) + 1), spec, regs))
    return stages


def _run_stage(stage: _Stage, model, inspection, plan, calib, cfg, registry, work: Path, progress: bool,
               run_info: RunInfo, teacher, stream=(None, "cpu")) -> dict:
    """One stage on ``model`` in place; ``teacher()`` gives the fp model for block/model refiners."""
    registry.hook.on_stage_start(run=run_info, stage=stage.info)
    if stage.spec is None:
        layer_refiners = [registry.create(s) for s in cfg.refiners if registry.get("refiner", s.name).scope == "layer"]
        ctx = LayerwiseContext(model, inspection, plan, layer_refiners, registry, calib, cfg.calibration.batch_size,
                               work, cfg.seed, progress, run_info, cfg.calibration.sequential, cfg.calibration.keep_mb,
                               *stream)
        return run_layerwise(ctx)
    refiner = registry.create(stage.spec)
    ctx = StageContext(model, teacher(), inspection, calib, cfg.calibration.batch_size, registry,
                       [registry.create(r) for r in stage.regularizers], cfg.seed, progress, work)
    if stage.info.scope == "block":
        return refiner.refine_block(ctx) or {}
    return refiner.refine_model(ctx) or {}


def compress(model: torch.nn.Module, tokenizer=None, config=None, *, windows: torch.Tensor | None = None,
             registry: Registry | None = None, progress: bool = False) -> list[StageReport]:
    """Compress ``model`` in place with a pipeline config's plan and stages, without an output directory.

    ``config`` is a path, a dict or None (the default pipeline); its ``model``, ``output`` and
    ``evaluation`` sections are ignored. Calibration windows come from ``config.calibration``
    through ``tokenizer``, or directly from ``windows`` (a ``[n, seq_len]`` token tensor).
    Returns one report per stage (no perplexities: evaluate with ``onecomp.evaluation``)."""
    import copy
    import tempfile

    registry = registry or Registry.default()
    cfg: PipelineConfig = load_config(config, registry)
    if windows is None:
        if tokenizer is None:
            raise RunError("compress() needs a tokenizer for the calibration corpus, or windows=")
        windows = calibration_windows(tokenizer, cfg.calibration.corpus, cfg.calibration.samples,
                                      cfg.calibration.seq_len, cfg.calibration.seed)
    torch.manual_seed(cfg.seed)
    model.eval()
    inspection = inspect_model(model)
    plan = make_plan(registry.create(cfg.planner), inspection, cfg, registry, model, windows, None, progress)
    run_info = RunInfo(config=cfg.raw, out_dir=None, model=type(model).__name__,
                       plan={k: v.to_dict() for k, v in plan.items()})
    registry.hook.on_run_start(run=run_info)
    stages = _stages(cfg, registry)
    fp_copy = copy.deepcopy(model) if len(stages) > 1 else None
    reports = []
    with tempfile.TemporaryDirectory(prefix="onecomp-") as tmp:
        for stage in stages:
            with Timer() as timer, PeakMemory() as mem:
                details = _run_stage(stage, model, inspection, plan, windows, cfg, registry,
                                     Path(tmp) / f"{stage.info.index:02d}-{stage.info.name}", progress, run_info,
                                     lambda: fp_copy)
            report = StageReport(stage.info.name, stage.info.index, stage.info.scope, "", {}, bits_summary(model),
                                 timer.seconds, mem.peak_mb, details)
            registry.hook.on_stage_end(run=run_info, stage=stage.info, report=report)
            reports.append(report)
    return reports
