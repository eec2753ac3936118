"""Reliability of runs: SIGKILL at many points resumes bit-identically, one run per output directory,
half-written leftovers cleaned, early failures block nothing, every bad input one clean line."""

import errno
import json
import os
import socket
import subprocess
import sys
import time

import pytest

import onecomp
from onecomp import RunError, hookimpl
from onecomp.cli import main as cli


def config(model_dir, out, quantizer=None, refiners=(), **extra):
    return {
        "model": {"id": str(model_dir)},
        "calibration": {"corpus": "kjv", "samples": 4, "seq_len": 32, "batch_size": 2},
        "plan": {"planner": "uniform", "quantizer": quantizer or {"name": "rtn", "bits": 4, "group_size": 32}},
        "refiners": list(refiners),
        "evaluation": {"texts": ["kjv-gospels"], "windows": 1, "seq_len": 32, "before": False},
        "output": {"dir": str(out)},
        **extra,
    }


def write(path, cfg):
    path.write_text(json.dumps(cfg))
    return str(path)


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


# ------------------------------------------------------------------ SIGKILL and resume, in real processes

#: run inside the child: the CLI with a kill switch; ONECOMP_TEST_KILL = "<point>:<n>" kills the process
#: with SIGKILL at the n-th time it reaches <point>
KILLER = r'''
import os, signal, sys
point, _, n = os.environ.get("ONECOMP_TEST_KILL", ":0").partition(":")
n, seen = int(n or 0), {}

def reached(name):
    if name == point:
        seen[name] = seen.get(name, 0) + 1
        if seen[name] == n:
            os.kill(os.getpid(), signal.SIGKILL)

import torch
import onecomp.checkpoint.blocks as blocks
import onecomp.checkpoint.io as io
from onecomp import hookimpl
from onecomp.registry import Registry

def wrap(owner, attr, before=None, after=None):
    original = getattr(owner, attr)
    def wrapped(*a, **k):
        if before: reached(before)
        out = original(*a, **k)
        if after: reached(after)
        return out
    setattr(owner, attr, wrapped)

wrap(blocks, "save_file", after="block-mid")          # a block's tensors written, its JSON not yet
wrap(blocks.BlockStore, "save", after="block-done")   # a block complete on disk
wrap(io, "save_file", after="checkpoint-mid")          # a checkpoint's weights written in its temporary dir
wrap(torch.optim.Adam, "step", before="train-step")   # inside a training refiner's optimisation
replace = os.replace
def replacing(src, dst, *a, **k):
    replace(src, dst, *a, **k)
    if ".old" in os.path.basename(str(dst)):
        reached("between-renames")                     # old checkpoint moved aside, the new one not in place
os.replace = replacing

class Hooks:
    @hookimpl
    def on_checkpoint_written(self, run, checkpoint):
        reached("before-run-json")                     # checkpoint in place, run.json not updated
Registry.default().pm.register(Hooks(), name="kill-switch")
from onecomp.cli import main
sys.exit(main(["run", *sys.argv[1:]]))
'''


def child(args, kill=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ONECOMP_TEST_KILL": kill or ""}
    return subprocess.run([sys.executable, "-c", KILLER, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_sigkill_at_many_points_resumes_to_a_bit_identical_checkpoint(tiny_model_dir, tmp_path):
    """Killed with SIGKILL at four points of the layer-wise stage and two of the blockwise training refiner,
    each time resumed with --resume: both checkpoints equal an uninterrupted run's byte for byte."""
    cfg = config(tiny_model_dir, tmp_path / "x", {"name": "gptq", "bits": 3, "group_size": 32},
                 [{"name": "blockwise", "epochs": 1, "samples": 4, "batch_size": 2}])
    ref = child([write(tmp_path / "ref.json", {**cfg, "output": {"dir": str(tmp_path / "ref")}}), "--quiet"])
    assert ref.returncode == 0, ref.stderr
    path = write(tmp_path / "run.json", {**cfg, "output": {"dir": str(tmp_path / "run")}})
    points = ["block-mid:1", "checkpoint-mid:1", "before-run-json:1", "between-renames:1",  # layer-wise stage
              "train-step:2", "block-done:1"]  # blockwise: mid block 0's optimisation, after block 0 is saved
    leftovers = set()
    for i, point in enumerate(points):
        got = child([path, "--quiet", *(["--resume"] if i else [])], kill=point)
        assert got.returncode == -9, f"{point}: the kill point was not reached (exit {got.returncode}): {got.stderr}"
        leftovers |= {p.name.rstrip("0123456789") for p in (tmp_path / "run").glob(".01-layerwise.*")}
    assert leftovers == {".01-layerwise.tmp", ".01-layerwise.old"}  # what the cleanup below must remove
    done = child([path, "--quiet", "--resume"])
    assert done.returncode == 0, done.stderr
    for stage in ("01-layerwise", "02-blockwise"):
        a = (tmp_path / "ref" / stage / "model.safetensors").read_bytes()
        b = (tmp_path / "run" / stage / "model.safetensors").read_bytes()
        assert a == b, f"{stage}: the resumed checkpoint differs from the uninterrupted run's"
    assert not [p.name for p in (tmp_path / "run").glob(".*") if p.name != ".work"]  # .tmp/.old and the lock gone


# ------------------------------------------------------------------ one run per directory, leftovers, early failures


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_a_second_run_on_a_directory_is_refused_naming_the_holder(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = os.getppid()  # a live process that is not this one
    (out / ".lock").write_text(json.dumps({"pid": holder, "host": socket.gethostname(), "since": "then"}))
    t0 = time.perf_counter()
    with pytest.raises(RunError, match=rf"in use by another onecomp run \(pid {holder}, lock file"):
        onecomp.run(config(tiny_model_dir, out), progress=False)
    assert time.perf_counter() - t0 < 5 and not (out / "run.json").exists()


def test_a_stale_lock_is_taken_over_and_released(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    onecomp.run(config(tiny_model_dir, out), progress=False)
    assert (out / "01-layerwise" / "onecomp.json").exists() and not (out / ".lock").exists()
    (out / ".lock").write_text("{half a lock")  # its writer died before finishing it
    onecomp.run(config(tiny_model_dir, out), progress=False)


def test_two_processes_on_one_directory(tiny_model_dir, tmp_path):
    """A real second process while the first holds the lock: refused at once with exit 2, naming the pid."""
    out = tmp_path / "run"
    path = write(tmp_path / "c.json", config(tiny_model_dir, out))
    holder = ("import sys, time; from pathlib import Path; from onecomp.pipeline.run import _lock; "
              "p = Path(sys.argv[1]); p.mkdir(); _lock(p); print('locked', flush=True); time.sleep(60)")
    first = subprocess.Popen([sys.executable, "-c", holder, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "locked"
        second = subprocess.run([sys.executable, "-m", "onecomp", "run", path, "--quiet"], capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2
        assert last_line(second.stderr).startswith(f"error: output.dir: {out} is in use by another onecomp run "
                                                   f"(pid {first.pid}")
    finally:
        first.kill()
        first.wait()
    assert cli(["run", path, "--quiet"]) == 0  # the holder died: its lock is stale and taken over


def test_leftovers_of_a_killed_write_are_removed(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    onecomp.run(config(tiny_model_dir, out), progress=False)
    (out / ".01-layerwise.tmp4242").mkdir()
    (out / ".01-layerwise.tmp4242" / "model.safetensors").write_bytes(b"half")
    (out / ".01-layerwise.old4242").mkdir()
    (out / ".run.json.tmp4242").write_text("{")
    onecomp.run(config(tiny_model_dir, out), progress=False)
    assert sorted(p.name for p in out.glob(".*")) == []


def test_an_early_failure_blocks_nothing_and_resume_says_what_happened(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    typo = config(tmp_path / "no-such-model", out)
    with pytest.raises(onecomp.OneCompError, match="not found"):
        onecomp.run(typo, progress=False)
    state = json.loads((out / "run.json").read_text())
    assert "ModelLoadError" in state["stopped"]
    good = write(tmp_path / "good.json", config(tiny_model_dir, out))
    assert cli(["run", good, "--resume", "--quiet"]) == 2  # --resume of another config: says why
    err = capsys.readouterr().err
    assert "stopped before finishing any block (ModelLoadError" in err and "run without --resume" in err
    assert cli(["run", good, "--quiet"]) == 0  # the corrected config runs in the same directory
    assert cli(["run", "--resume", "--output", str(tmp_path / "elsewhere")]) == 2
    assert "pass the same config" in capsys.readouterr().err


def test_resume_after_an_interrupt_before_the_first_block(tiny_model_dir, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    run_module = sys.modules["onecomp.pipeline.run"]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "load_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        onecomp.run(config(tiny_model_dir, out), progress=False)
    assert json.loads((out / "run.json").read_text())["stopped"].startswith("interrupted")
    monkeypatch.undo()
    with caplog.at_level("INFO", logger="onecomp"):
        onecomp.run(config(tiny_model_dir, out), resume=True, progress=False)
    assert "which stopped: interrupted" in caplog.text


def test_a_corrupted_work_file_says_how_to_recompute(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    registry = onecomp.Registry()

    class Crash:
        @hookimpl
        def on_block_done(self, run, block):
            raise RuntimeError("simulated crash")

    cfg = config(tiny_model_dir, out, {"name": "gptq", "bits": 4, "group_size": 32})
    with registry.temporarily(Crash(), name="crash"), pytest.raises(RuntimeError):
        onecomp.run(cfg, registry=registry, progress=False)
    work = out / ".work" / "01-layerwise"
    (work / "block-000.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(RunError, match="block 0 are corrupted.*delete block-000.safetensors and block-000.json"):
        onecomp.run(cfg, registry=registry, resume=True, progress=False)
    os.remove(work / "block-000.safetensors")
    os.remove(work / "block-000.json")
    onecomp.run(cfg, registry=registry, resume=True, progress=False)


def test_output_dir_that_is_a_file(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    path = write(tmp_path / "c.json", config(tiny_model_dir, tmp_path / "file"))
    assert cli(["run", path, "--quiet"]) == 2
    assert last_line(capsys.readouterr().err) == f"error: output.dir: {tmp_path / 'file'} is a file; choose a " \
                                                 "directory (it is created if missing)"


def test_a_full_disk_is_one_clean_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import onecomp.checkpoint.io as io

    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(io, "save_file", full)
    out = tmp_path / "run"
    assert cli(["run", write(tmp_path / "c.json", config(tiny_model_dir, out)), "--quiet"]) == 2
    err = last_line(capsys.readouterr().err)
    assert err.startswith("error: ") and err.endswith("model.safetensors: No space left on device; free some space "
                                                      "and rerun with --resume")
    assert not list(out.glob(".01-layerwise.tmp*"))


@pytest.mark.parametrize("flag", ["--windows", "--seq-len", "--batch-size"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_eval_arguments_out_of_range(tiny_model_dir, capsys, flag, value):
    assert cli(["eval", str(tiny_model_dir), flag, value]) == 2
    assert capsys.readouterr().err == f"error: {flag}: must be a positive integer, got {value}\n"


# ------------------------------------------------------------------ numbers: nothing non-finite or degenerate written

SCALED = "model.layers.1.mlp.down_proj"


@pytest.mark.parametrize("quantizer", [{"name": "rtn", "bits": 4, "group_size": 32},
                                       {"name": "gptq", "bits": 4, "group_size": 32}])
@pytest.mark.parametrize("factor, message", [(1e7, "beyond float16's range"), (1e-9, "every weight rounds to zero")])
def test_weights_out_of_fp16_scale_range_are_refused_naming_the_layer(tiny_llama, calib_batch, quantizer, factor,
                                                                     message):
    import torch

    with torch.no_grad():
        tiny_llama.get_submodule(SCALED).weight.mul_(factor)
    cfg = {"calibration": {"samples": 4, "seq_len": 32}, "plan": {"planner": "uniform", "quantizer": quantizer}}
    with pytest.raises(onecomp.FormatError, match=f"{SCALED}: .*{message}"):
        onecomp.compress(tiny_llama, config=cfg, windows=calib_batch)


def test_a_scaled_layer_fails_the_run_with_one_line_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    import torch

    with torch.no_grad():
        model.get_submodule(SCALED).weight.mul_(1e7)
    model.save_pretrained(tmp_path / "scaled")
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special")):
            (tmp_path / "scaled" / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "run"
    assert cli(["run", write(tmp_path / "c.json", config(tmp_path / "scaled", out)), "--quiet"]) == 2
    assert last_line(capsys.readouterr().err).startswith(f"error: {SCALED}: its weights")
    assert not (out / "01-layerwise").exists()


def test_an_indefinite_hessian_is_retried_with_more_damping_and_reported():
    import torch
    from onecomp import LayerStats, LayerTask, Registry

    gptq = Registry.default().get("quantizer", "gptq")
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 16, generator=g)
    X = torch.randn(64, 16, generator=g)
    H = X.T @ X / 64
    ok = gptq(gptq.Config(group_size=-1)).quantize(LayerTask("pd", W, LayerStats(64, H.clone())))
    assert "damp" not in ok.info and "damp_retries" not in ok.info  # a positive definite H: untouched
    bad = H.clone()
    bad[0, 0] = -5.0  # not positive definite, and 0.01·mean(diag) does not fix it
    q = gptq(gptq.Config(group_size=-1)).quantize(LayerTask("indefinite", W, LayerStats(64, bad)))
    assert q.info["damp_retries"] >= 1 and q.info["damp"] > 0.01
    nan = H.clone()
    nan[1, 2] = float("nan")
    with pytest.raises(onecomp.FormatError, match="nan: the Hessian holds NaN"):
        gptq(gptq.Config()).quantize(LayerTask("nan", W, LayerStats(64, nan)))


@pytest.mark.parametrize("content, message", [(b"caf\xe9 au lait", "is not UTF-8 text"),
                                              (b"\x00\x00", "is a binary file")])
def test_eval_text_files_that_are_not_text(tiny_model_dir, tmp_path, capsys, content, message):
    (tmp_path / "t.txt").write_bytes(content)
    assert cli(["eval", str(tiny_model_dir), "--text", str(tmp_path / "t.txt"), "--windows", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --text: '{tmp_path / 't.txt'}' {message}") and err.count("\n") == 1
