"""How benchmarks/compare.py measures: peer venvs, the shared inputs, one subprocess per row, results/compare.json.

Every row runs in its own process so that its wall time and peak RSS (``ru_maxrss`` from ``wait4``) are the tool's
alone; the rows are checked against the protocol's fp32 figures and recorded one at a time.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, TEXTS
from compare_catalogue import QUALITY_ALIASES, TOOLS, TORCH, VENVS, venv_python

PEERS = Path(__file__).resolve().parent / "peers"
JSON = RESULTS / "compare.json"
#: the protocol's calibration and evaluation windows; smaller runs never write JSON
FULL = {"samples": 128, "windows": 40}
FP_REFERENCE = {"kjv-gospels": 15.02, "pydoc-topics": 14.01}  # docs/protocol.md, fp32

#: prints the unconditional (non-extra) requirements of a distribution, one a line
DEPS_OF = """
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement
for r in requires(sys.argv[1]) or []:
    req = Requirement(r)
    if req.marker is None or req.marker.evaluate({"extra": ""}):
        print(str(req))
"""


# ---------------------------------------------------------------- peer environments


def pip(tool: str, *args: str, env: dict | None = None) -> None:
    """``pip install`` in the tool's venv, echoing the command."""
    cmd = [str(venv_python(tool)), "-m", "pip", "install", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})})


def setup(tool: str) -> None:
    """A fresh venv with the local CPU torch first, then the tool under a torch==2.13.0 constraint."""
    spec = TOOLS[tool]
    root = VENVS / tool
    if not venv_python(tool).exists():
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    constraints = root / "constraints.txt"
    constraints.write_text(TORCH + "\n")
    pip(tool, "--upgrade", "pip", "setuptools", "wheel")
    pip(tool, TORCH)
    pip(tool, "-c", str(constraints), *spec.get("pip_args", []), *spec["pip"], env=spec.get("env"))
    if spec.get("then_deps_of"):
        # -I and cwd=root: never the metadata of our own onecomp (an egg-info in the work tree)
        reqs = subprocess.run([str(venv_python(tool)), "-I", "-c", DEPS_OF, spec["then_deps_of"]], check=True,
                              capture_output=True, text=True, cwd=str(root)).stdout.split("\n")
        pip(tool, "-c", str(constraints), *[r for r in reqs if r.strip()], env=spec.get("env"))
    # what the runners need besides the tool (already there through the tool's own dependencies, mostly)
    pip(tool, "-c", str(constraints), "transformers", "safetensors", "accelerate", "psutil")


# ---------------------------------------------------------------- inputs shared by every tool


def model_dir() -> Path:
    """The embedded model as an fp32 HF directory (converted from GGUF once and cached by onecomp)."""
    import hashlib

    from onecomp.models import load_model
    from onecomp.models.load import cache_dir, embedded_path

    gguf = embedded_path("smollm2-135m")
    stat = gguf.stat()  # the cache key onecomp.models.load uses for converted GGUF files
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    path = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if not (path / "model.safetensors").exists():
        load_model("smollm2-135m")  # converts and caches
    if not (path / "model.safetensors").exists():
        raise SystemExit(f"the converted model is not where onecomp caches it ({path})")
    return path


def write_inputs(work: Path, samples: int, windows: int, seq_len: int = 512, seed: int = 0) -> Path:
    """Calibration windows (KJV Genesis–Deuteronomy, seeded) and evaluation windows of both texts, from
    onecomp's own protocol code, in one safetensors file every runner reads."""
    path = work / f"inputs-c{samples}x{seq_len}-e{windows}.safetensors"
    if path.exists():
        return path
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from onecomp.calibration import calibration_windows
    from onecomp.config import CorpusSpec
    from onecomp.evaluation import eval_windows

    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    tensors = {"calib": calibration_windows(tok, [CorpusSpec("kjv")], samples, seq_len, seed).contiguous()}
    for text in TEXTS:
        tensors[f"eval/{text}"] = eval_windows(tok, text, windows, seq_len).contiguous()
    work.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"samples": str(samples), "windows": str(windows),
                                            "seq_len": str(seq_len), "seed": str(seed), "corpus": "kjv"})
    return path


# ---------------------------------------------------------------- running one setting


def run_one(tool: str, setting: str, params: dict, inputs: Path, work: Path, threads: int) -> dict:
    """One runner subprocess; its JSON line plus its peak RSS (ru_maxrss from wait4) and wall time."""
    if tool == "ours":
        python, runner, env = sys.executable, PEERS / "ours_run.py", {}
    else:
        python, runner = venv_python(tool), PEERS / f"{tool.replace('-', '_')}_run.py"
        env = {k: v for k, v in TOOLS[tool].get("env", {}).items() if not k.startswith(("BUILD", "GPTQMODEL_BUILD"))}
        if not python.exists():
            raise RuntimeError(f"no environment for {tool}: run `python benchmarks/compare.py --setup {tool}`")
    out = work / "out" / tool / setting
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(python), str(runner), "--model", str(model_dir()), "--inputs", str(inputs), "--out", str(out),
           "--threads", str(threads), "--setting", json.dumps(params), "--name", setting]
    thread_env = {v: str(threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    full_env = {**os.environ, **thread_env, **env, "PYTHONNOUSERSITE": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if tool != "ours":
        full_env.pop("PYTHONPATH", None)
    log = out / "log.txt"
    print(f"[{tool} {setting}] {' '.join(cmd[1:2])} … (log: {log})", flush=True)
    t0 = time.perf_counter()
    with open(out / "stdout.txt", "w") as so, open(log, "w") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env=full_env, cwd=str(out))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    lines = [ln for ln in (out / "stdout.txt").read_text().splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        lines = log.read_text().strip().splitlines()
        errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b", ln)]
        raise RuntimeError(f"{tool} {setting} failed (exit {proc.returncode}); last lines of {log}:\n"
                           + "\n".join(lines[-15:]) + "\n" + (errors[-1] if errors else lines[-1] if lines else ""))
    row = json.loads(lines[-1][len("RESULT "):])
    row["peak_rss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux: the whole subprocess, load to exit
    row["wall_seconds"] = wall
    row["date"] = time.strftime("%Y-%m-%d %H:%M")
    row["host"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    return row


def ours_from_quality(setting: str) -> dict | None:
    """An our-row rebuilt from results/quality.json (no rerun; peak RSS is the stage's, not the process's)."""
    if setting == "fp32":
        fp = load_results(RESULTS / "fp32.json")
        return fp and {"tool": "ours", "setting": "fp32", "ppl": fp["ppl"], "threads": fp["env"]["threads"],
                       "versions": {k: fp["env"].get(k) for k in ("onecomp", "torch", "transformers")},
                       "date": fp["env"].get("date"), "source": "results/fp32.json"}
    quality = load_results(RESULTS / "quality.json")
    alias = QUALITY_ALIASES.get(setting) if setting not in quality else None
    q = quality.get(alias or setting)
    if not q:
        return None
    return {"tool": "ours", "setting": setting, "ppl": q["ppl"], "bits": {"bits_per_weight": q["bits_per_weight"]},
            "quant_seconds": q["quant_seconds"], "peak_rss_mb": q["peak_rss_mb"], "threads": q["env"]["threads"],
            "versions": {k: q["env"].get(k) for k in ("onecomp", "torch", "transformers")},
            "date": q["env"].get("date"), "source": f"results/quality.json row {alias or setting} (stage peak RSS, "
                                                    "psutil-sampled; not rerun by compare.py)"}


def sanity(row: dict) -> list[str]:
    """Warnings for an implausible row: fp32 must match the reference; quantized rows must sit in a range."""
    warn = []
    ppl = row.get("ppl") or {}
    if row["setting"] == "fp32":
        for t, ref in FP_REFERENCE.items():
            if t in ppl and abs(ppl[t] - ref) > 0.01:
                warn.append(f"fp32 ppl on {t} is {ppl[t]:.3f}, the protocol's is {ref}")
    else:
        for t, v in ppl.items():
            if not (FP_REFERENCE[t] * 0.98 <= v <= 2000):
                warn.append(f"ppl on {t} is {v:.2f}: outside any plausible range")
    return warn


# ---------------------------------------------------------------- recording


def load_results(path: Path = JSON) -> dict:
    """A results file as a dict (empty when it does not exist yet)."""
    return json.loads(path.read_text()) if path.exists() else {}


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def record_row(path: Path, key: str, row: dict) -> None:
    """Store a row under ``tool/setting``; a setting that runs again is no longer listed as unavailable."""
    data = load_results(path)
    data[key] = row
    data.get("_unavailable", {}).pop(key, None)
    _write(path, data)


def record_failure(path: Path, key: str, error: str) -> None:
    """List a setting that failed under ``_unavailable`` with the last line of its error (any old row stays)."""
    data = load_results(path)
    data.setdefault("_unavailable", {})[key] = error.splitlines()[-1][:400]
    _write(path, data)


def measure(tool: str, setting: str, params: dict, *, inputs: Path, work: Path, threads: int, out_json: Path,
            from_quality: bool, samples: int, windows: int) -> dict | None:
    """Run (or, with ``from_quality``, rebuild) one row, check and record it; None when it could not be had."""
    key = f"{tool}/{setting}"
    if tool == "ours" and from_quality:
        row = ours_from_quality(setting)
        if row is None:
            print(f"{key}: not in results/quality.json; run it without --ours-from-quality", file=sys.stderr)
            return None
    else:
        try:
            row = run_one(tool, setting, params, inputs, work, threads)
        except RuntimeError as exc:
            print(str(exc), file=sys.stderr)
            record_failure(out_json, key, str(exc))
            return None
    row["protocol"] = {"samples": samples, "windows": windows, "seq_len": 512, "seed": 0}
    row["warnings"] = sanity(row) if samples == FULL["samples"] and windows == FULL["windows"] else []
    record_row(out_json, key, row)
    return row
