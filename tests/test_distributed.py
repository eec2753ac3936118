"""Data-parallel calibration with torch.distributed (gloo, 2 CPU processes) on a tiny model: the checkpoint
equals the single-process one bit for bit; a rank that dies stops the run with a clear error; --resume
continues it."""

import datetime
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

import onecomp
from onecomp import distributed
from onecomp.calibration import StatsCollector
from onecomp.errors import RunError

#: GPTQ with QEP's layer refiner: the hessian and the cross statistic (fp and quantized paths) are reduced.
#: 6 windows in batches of 2: 3 batches, 2 on rank 0 and 1 on rank 1. Then a blockwise stage, which runs
#: on rank 0 alone after the others have left.
QUANTIZER = {"name": "gptq", "bits": 3, "group_size": 32}


def config(model_dir, out):
    return {"model": {"id": str(model_dir)},
            "calibration": {"corpus": "kjv", "samples": 6, "seq_len": 64, "batch_size": 2},
            "plan": {"planner": "uniform", "quantizer": QUANTIZER},
            "refiners": [{"name": "qep", "alpha": 0.5}, {"name": "blockwise", "epochs": 1, "batch_size": 1}],
            "evaluation": {"texts": [], "before": False},
            "output": {"dir": str(out)}}


STAGES = ("01-layerwise", "02-blockwise")


def tensors(out: Path) -> dict:
    """Every stage checkpoint's tensors, by stage."""
    from safetensors.torch import load_file

    return {stage: load_file(out / stage / "model.safetensors") for stage in STAGES}


def assert_identical(a: dict, b: dict):
    for stage in STAGES:
        assert a[stage].keys() == b[stage].keys()
        different = [k for k in a[stage] if not torch.equal(a[stage][k], b[stage][k])]
        assert not different, f"{stage}: tensors differ: {different[:5]}"


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory):
    """The single-process run's checkpoint tensors."""
    out = tmp_path_factory.mktemp("single") / "run"
    onecomp.run(config(tiny_model_dir, out), progress=False)
    return tensors(out)


def test_stats_do_not_depend_on_how_batches_are_split():
    """float64 sums of float32 per-batch terms: one collector over 5 batches equals two collectors over
    a split of them added together, bit for bit (what the all-reduce computes)."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(37, 48, generator=g) * s, torch.randn(37, 48, generator=g)) for s in (1, 3, 0.1, 10, 1)]
    whole = StatsCollector({"hessian", "cross", "diag"}, 48)
    parts = [StatsCollector({"hessian", "cross", "diag"}, 48) for _ in range(2)]
    for i, (X_hat, X) in enumerate(batches):
        whole.add(X_hat, X)
        parts[i >= 2].add(X_hat, X)  # batches 0-1 on "rank 0", 2-4 on "rank 1"
    for name in ("H", "cross", "sq"):
        getattr(parts[1], name).add_(getattr(parts[0], name))  # rank 1's share plus rank 0's: another order
    parts[1].n += parts[0].n
    a, b = whole.finish(), parts[1].finish()
    assert a.n_tokens == b.n_tokens == 5 * 37
    for name in ("H", "cross", "diag"):
        assert getattr(a, name).dtype == torch.float32
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.H, a.H.T)


def test_shard_covers_every_batch_once_in_order(monkeypatch):
    for world, n in [(2, 3), (3, 7), (4, 4), (1, 5)]:
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        shares = []
        for r in range(world):
            monkeypatch.setattr(distributed, "rank", lambda: r)
            shares.append(distributed.shard(n))
        assert [i for s in shares for i in s] == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    with pytest.raises(RunError, match="3 batches for 4 processes"):
        distributed.shard(3)


def test_torchrun_two_processes_give_the_single_process_checkpoint(tiny_model_dir, tmp_path, single):
    """``torchrun --nproc-per-node 2 -m onecomp run CONFIG``: bit-identical checkpoint, written by rank 0."""
    out = tmp_path / "dp"
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(config(tiny_model_dir, out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ONECOMP_DIST_TIMEOUT": "60"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "onecomp", "run", str(cfg), "--quiet"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("# ") >= 1  # rank 0 printed the report; the other rank printed nothing
    assert_identical(tensors(out), single)
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["layerwise", "blockwise"]


def _worker(rank: int, world: int, store: str, cfg: dict, die_after_block: int | None, result: str):
    """One process of a data-parallel run with its own process group (short timeout); rank 1 may die."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    registry = onecomp.Registry()

    class Die:
        @onecomp.hookimpl
        def on_block_done(self, run, block):
            if rank == 1 and block.index == die_after_block:
                os._exit(3)  # no clean-up, no message: as a killed process

    try:
        with registry.temporarily(Die(), name="die"):
            onecomp.run(cfg, registry=registry, progress=False)
        Path(f"{result}.{rank}").write_text("ok")
    except Exception as exc:
        Path(f"{result}.{rank}").write_text(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")


def test_a_dying_rank_stops_the_run_and_resume_continues(tiny_model_dir, tmp_path, single):
    out = tmp_path / "run"
    cfg = config(tiny_model_dir, out)
    result = str(tmp_path / "result")
    args = [json.dumps([2, str(tmp_path / "store"), cfg, 0, result])]
    procs = [subprocess.Popen([sys.executable, __file__, str(r), *args]) for r in range(2)]
    for p in procs:
        try:
            p.wait(timeout=240)
        except subprocess.TimeoutExpired:
            pass
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.kill()
    assert not alive, "a process hung after its peer died"
    assert procs[1].returncode == 3
    error = Path(f"{result}.0").read_text()
    assert error.startswith("RunError: rank 0 of 2:") and "rerun with --resume" in error, error
    assert (out / ".work" / "01-layerwise" / "block-000.json").exists()  # rank 0 kept the finished block
    assert not (out / "01-layerwise").exists()

    quantized = []

    class Count:
        @onecomp.hookimpl
        def on_layer_quantized(self, run, layer):
            quantized.append(layer.name)

    registry = onecomp.Registry()
    with registry.temporarily(Count(), name="count"):
        onecomp.run(cfg, registry=registry, resume=True, progress=False)  # one process now: the same statistics
    assert quantized and all(".layers.1." in n for n in quantized)
    assert_identical(tensors(out), single)


if __name__ == "__main__":  # a worker process of test_a_dying_rank_stops_the_run_and_resume_continues
    _worker(int(sys.argv[1]), *json.loads(sys.argv[2]))
