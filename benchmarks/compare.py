"""One-invocation comparison with peer tools on the benchmark protocol (BENCHMARK.md).

    python benchmarks/compare.py --setup [tool ...]          # create benchmarks/.venvs/<tool> (once)
    python benchmarks/compare.py                             # every tool and setting below, then the table
    python benchmarks/compare.py --only llmcompressor --settings w4a16-g128
    python benchmarks/compare.py --only ours --ours-from-quality   # our rows from results/quality.json
    python benchmarks/compare.py --fp                        # fp32 check in every environment
    python benchmarks/compare.py --samples 8 --windows 2 --scratch   # quick harness check, nothing recorded
    python benchmarks/compare.py --table                     # regenerate compare.md / compare.png only

Every tool runs in a subprocess with the same torch thread count (``--threads``), on the very same
calibration and evaluation token windows, which this script writes once to ``<work>/inputs.safetensors``
from our own protocol code. Peers run in their own virtual environment (benchmarks/.venvs/<tool>) through
a runner in benchmarks/peers/ that never imports our onecomp; each prints one JSON line with its ppl, bits
per weight (from the tensors it saved), quantization time and load averages. This script adds the
subprocess's peak resident memory (``ru_maxrss`` from ``wait4``) and records the row in
results/compare.json, then regenerates results/compare.md and results/compare.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, TEXTS, fmt  # noqa: E402

VENVS = HERE / ".venvs"
PEERS = HERE / "peers"
TORCH = "torch==2.13.0"

#: tool -> how to install it (pip requirements, extra pip args, environment) and its settings
TOOLS = {
    "llmcompressor": {
        "pip": ["llmcompressor"], "dists": ["llmcompressor", "compressed-tensors", "transformers"],
        "settings": {
            # group 128 does not run on the 576-wide layers (see docs/benchmarks.md); 576 = 9 × 64
            "w4a16-g64": {"bits": 4, "group_size": 64},
            "w3a16-g64": {"bits": 3, "group_size": 64},
            "w4a16-g128": {"bits": 4, "group_size": 128, "bypass": True},
            "w4a16-g128-nobypass": {"bits": 4, "group_size": 128, "bypass": False},
        }},
    "onecomp-orig": {
        # the original authors' release; it declares Python >= 3.12 but installs and runs on 3.11
        # (pip would then also consider dependencies' releases for 3.12 only, e.g. a scipy sdist that refuses
        # to build, so the package goes in alone and its declared dependencies follow under normal rules)
        "pip": ["onecomp"], "pip_args": ["--ignore-requires-python", "--no-deps"], "then_deps_of": "onecomp",
        "dists": ["onecomp", "transformers"],
        "settings": {
            "gptq-w4g128": {"method": "gptq", "bits": 4, "group_size": 128},
            "gptq-w3g128": {"method": "gptq", "bits": 3, "group_size": 128},
            "gptq-w4g128-actorder-asym": {"method": "gptq", "bits": 4, "group_size": 128, "act_order": True,
                                          "sym": False},
            "gptq-w3g128-actorder-asym": {"method": "gptq", "bits": 3, "group_size": 128, "act_order": True,
                                          "sym": False},
            "gptq+qep-w4g128": {"method": "gptq", "bits": 4, "group_size": 128, "qep": True},
            "gptq+qep-w3g128": {"method": "gptq", "bits": 3, "group_size": 128, "qep": True},
        }},
    "auto-round": {
        "pip": ["auto-round"], "dists": ["auto-round", "transformers"],
        "settings": {"w4g128": {"bits": 4, "group_size": 128},
                     # the release's own "light" recipe (auto_round/cli/main.py RECIPES): its default 200
                     # iterations would take about 3 h on these 2 cores (w4g128-iters2 check: ~15 s per block)
                     "w4g128-light": {"bits": 4, "group_size": 128, "iters": 50, "lr": 5e-3},
                     "w4g128-iters2": {"bits": 4, "group_size": 128, "iters": 2}}},  # a quick harness check
    "gptqmodel": {
        "pip": ["gptqmodel"], "pip_args": ["--no-build-isolation"], "dists": ["gptqmodel", "transformers"],
        "env": {"BUILD_CUDA_EXT": "0", "GPTQMODEL_BUILD_CUDA_EXT": "0", "CUDA_VISIBLE_DEVICES": "",
                # its default CPU pool has (cores + 1) // 2 = 1 worker here, fewer than its own model
                # loader pool asks for (2): "Virtual pool 'model_loader:cpu' requests 2 workers"
                "GPTQMODEL_CPU_WORKERS": "2"},
        "settings": {"gptq-w4g128": {"bits": 4, "group_size": 128}, "gptq-w3g128": {"bits": 3, "group_size": 128}}},
    "hqq": {
        "pip": ["hqq"], "dists": ["hqq", "transformers"],
        "settings": {"w4g64": {"bits": 4, "group_size": 64}, "w4g128": {"bits": 4, "group_size": 128},
                     "w3g64": {"bits": 3, "group_size": 64}}},
}
#: printed under the table for every tool with rows
TOOL_NOTES = {
    "llmcompressor": "group 128 does not run on the 576-wide layers (refused at initialisation; with "
                     "`bypass_divisibility_checks=True` the GPTQ step fails in its observer), so its rows use "
                     "group 64; "
                     "it stores scales in the model's dtype (fp32 here), hence 4.50 / 3.50 bits per weight.",
    "onecomp-orig": "the original authors' release (PyPI onecomp 1.4.0), its GPTQ defaults: symmetric, no act-order, "
                    "damp 0.01; its default (non-QEP) GPTQ calibrates every layer on the fp model's activations in one "
                    "forward pass (no propagation of quantized outputs); g_idx is stored (int32 per input column).",
    "auto-round": "SignRound (sign-gradient tuning of rounding offsets and clipping, block by block), symmetric; "
                  "`w4g128-light` is the release's own light recipe (50 iterations, lr 5e-3; its time is in its row); "
                  "the default 200 iterations, 4x the tuning steps, did not fit in a session beside the other "
                  "runs; calibration windows passed as token tensors.",
    "hqq": "calibration-free; groups run over the flattened matrix, so at group 128 a group can span two rows of a "
           "576-wide layer.",
}
#: our settings (benchmarks/quality.py SETTINGS) compared with the peers
OURS = ["gptq-w4g128", "gptq-w3g128", "gptq+qep-w4g128", "gptq+qep-w3g128", "gptq-w4g64", "gptq+qep-w4g64",
        "gptq-w3g64", "gptq+qep-w3g64"]


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


def venv_python(tool: str) -> Path:
    return VENVS / tool / "bin" / "python"


def pip(tool: str, *args: str, env: dict | None = None) -> None:
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


# ---------------------------------------------------------------- results, table, plot, ratios

JSON = RESULTS / "compare.json"
FULL = {"samples": 128, "windows": 40}
FP_REFERENCE = {"kjv-gospels": 15.02, "pydoc-topics": 14.01}  # BENCHMARK.md, fp32
FAMILIES = {"gptq": "GPTQ", "gptq+qep": "GPTQ+QEP"}
LABELS = {**FAMILIES, "rtn-like": "(calibration-free)", "signround": "SignRound"}


def load_results(path: Path = JSON) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def save_row(path: Path, key: str, row: dict) -> None:
    data = load_results(path)
    data[key] = row
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


#: our settings recorded in quality.json under another name (same config: shrink 0.5 is GPTQ's default)
QUALITY_ALIASES = {"gptq-w4g128-minmax": "gptq-w4g128-shrink0.5"}


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


def family(row: dict) -> str:
    """The comparable method family of a row (our settings; peer rows map by their setting names)."""
    s = row["setting"]
    if s == "fp32":
        return "fp32"
    if "qep" in s:
        return "gptq+qep"
    if row["tool"] in ("hqq",):
        return "rtn-like"
    if row["tool"] == "auto-round":
        return "signround"
    return "gptq"


def bpw(row: dict):
    return (row.get("bits") or {}).get("bits_per_weight")


def ratios(data: dict) -> list[dict]:
    """For each peer row: every our row of the same family (GPTQ or GPTQ+QEP) at the nearest bits per weight
    (a default setting and its variants alike), for GPTQ-like peers also our GPTQ+QEP; ratios ours / peer."""
    ours = [r for r in data.values() if r["tool"] == "ours" and r["setting"] != "fp32" and bpw(r)]
    out = []
    for key, peer in sorted(data.items()):
        if peer["tool"] == "ours" or peer["setting"] == "fp32" or not bpw(peer) or not peer.get("ppl"):
            continue
        fams = [family(peer)] if family(peer) in FAMILIES else ["gptq"]
        if "gptq+qep" not in fams:
            fams.append("gptq+qep")
        for fam in fams:
            cands = [r for r in ours if family(r) == fam and r.get("ppl")]
            if not cands:
                continue
            gap = min(abs(bpw(r) - bpw(peer)) for r in cands)
            if gap > 0.5:
                continue
            # every our row at that nearest bpw (a default and its variants, e.g. `-mse`), by setting name
            for mine in sorted((r for r in cands if abs(bpw(r) - bpw(peer)) <= gap + 1e-9),
                               key=lambda r: r["setting"]):
                out.append({"peer": key, "ours": f"ours/{mine['setting']}" + (" ¹" if mine.get("source") else ""),
                            "bpw": (bpw(mine), bpw(peer)),
                            "ppl": {t: mine["ppl"][t] / peer["ppl"][t] for t in TEXTS},
                            "time": mine["quant_seconds"] / peer["quant_seconds"] if peer.get("quant_seconds")
                            else None,
                            "memory": mine["peak_rss_mb"] / peer["peak_rss_mb"] if peer.get("peak_rss_mb")
                            else None})
    return out


HEADER = """# OneComp vs peers on the benchmark protocol

SmolLM2-135M-Instruct (the embedded model) in fp32; every tool quantizes the same 128 × 512 calibration
tokens (KJV Genesis–Deuteronomy, seed 0) and is evaluated on the same 40 × 512-token windows of the KJV
gospels (in domain) and CPython's pydoc topics (out of domain), ppl = exp(mean over windows of
`model(ids, labels=ids).loss`) in fp32, each in its own process with the same torch thread count.
Generated by `benchmarks/compare.py` from `compare.json`; how to run it: docs/benchmarks.md.

- **bits/weight**: all bytes of every tensor the tool stored for the quantized decoder linear layers
  (q/k/v/o/gate/up/down of every block: codes, scales, zero points, g_idx or permutations, shape
  tensors), read from the safetensors files of the tool's saved output, × 8, divided by the number of
  weights of those layers (not embeddings, not lm_head).
- **quant time**: wall time of the tool's quantization call only (ours: the layer-wise stage), including
  its calibration forward passes, excluding evaluation and saving.
- **peak RSS**: `ru_maxrss` of the tool's whole subprocess (load, quantize, evaluate with batch 1, save).
- **load**: 1-minute load average at the start → end of the run; with 2 cores, a start value well above
  the thread count means the timing was taken while other jobs ran.
"""


#: the speed and memory target of the comparison: our GPTQ 4-bit g128 against llm-compressor's GPTQ
#: (group 64: its group 128 does not run on the 576-wide layers, see TOOL_NOTES)
SPEED_TARGET = ("ours/gptq-w4g128", "llmcompressor/w4a16-g64", 0.70, 1.00)


def speed_line(data: dict) -> str | None:
    """Our GPTQ's quantization time and peak RSS over llm-compressor's, against the targets."""
    mine, peer, t_max, m_max = SPEED_TARGET
    a, b = data.get(mine), data.get(peer)
    if not all(r and r.get("quant_seconds") and r.get("peak_rss_mb") for r in (a, b)):
        return None
    t, m = a["quant_seconds"] / b["quant_seconds"], a["peak_rss_mb"] / b["peak_rss_mb"]

    def verdict(x, limit):
        return f"{x:.3f} ({'meets' if x <= limit else 'misses'} ≤ {limit:.2f})"

    return (f"{mine} against {peer}, the same calibration tokens and threads: quantization time "
            f"{a['quant_seconds']:.0f} s / {b['quant_seconds']:.0f} s = {verdict(t, t_max)}; peak RSS "
            f"{a['peak_rss_mb']:.0f} / {b['peak_rss_mb']:.0f} MiB = {verdict(m, m_max)}. Time moves with the "
            "machine's load (the load column), so the two rows are run back to back.")


def table(data: dict) -> str:
    lines = [HEADER, "| tool | setting | bits/weight | ppl KJV gospels | ppl pydoc (OOD) | quant time (s) | "
             "peak RSS (MiB) | threads | load | versions |", "|---|---|---|---|---|---|---|---|---|---|"]
    order = {t: i for i, t in enumerate(["ours", *TOOLS])}
    for key in sorted(data, key=lambda k: (order.get(data[k]["tool"], 99), data[k]["setting"] != "fp32",
                                           -(bpw(data[k]) or 99), data[k]["setting"])):
        r = data[key]
        ppl = r.get("ppl") or {}
        load = (f"{r['loadavg_start'][0]:.1f} → {r['loadavg_end'][0]:.1f}" if r.get("loadavg_start")
                else "–")
        vers = ", ".join(f"{k} {v}" for k, v in (r.get("versions") or {}).items()
                         if k not in ("torch", "transformers") and v) or "–"
        vers += f"; transformers {r['versions'].get('transformers')}" if r.get("versions") else ""
        lines.append(f"| {r['tool']} | {r['setting']}{' ¹' if r.get('source') else ''} | "
                     f"{fmt(bpw(r) if r['setting'] != 'fp32' else 32.0, 3)} | {fmt(ppl.get(TEXTS[0]))} | "
                     f"{fmt(ppl.get(TEXTS[1]))} | {fmt(r.get('quant_seconds'), 0)} | {fmt(r.get('peak_rss_mb'), 0)} | "
                     f"{r.get('threads', '–')} | {load} | {vers} |")
    if any(r.get("source") for r in data.values()):
        lines.append("\n¹ reused from results/quality.json (`--ours-from-quality`): peak RSS there is the "
                     "layer-wise stage's (sampled), not the whole process's.")
    rs = ratios(data)
    if rs:
        lines += ["", "## Ratios ours / peer", "",
                  "Our rows of the same family at the nearest bits per weight, defaults and variants such as "
                  "`-minmax` (GPTQ's min-max grid, its default before the MSE grid) and `-mse4` (a coarse-to-fine "
                  "MSE grid) alike (and our GPTQ+QEP beside a peer's GPTQ). Below 1 is better for us. "
                  "¹ our row reused from quality.json: its time and memory were "
                  "measured in another session (memory: the stage's sampled peak, not the process's ru_maxrss), "
                  "so only the ppl ratios are like for like.", "",
                  "| ours | peer | bpw ours / peer | ppl gospels | ppl pydoc | quant time | peak RSS |",
                  "|---|---|---|---|---|---|---|"]
        for x in rs:
            lines.append(f"| {x['ours']} | {x['peer']} | {x['bpw'][0]:.3f} / {x['bpw'][1]:.3f} | "
                         f"{x['ppl'][TEXTS[0]]:.3f} | {x['ppl'][TEXTS[1]]:.3f} | {fmt(x['time'])} | "
                         f"{fmt(x['memory'])} |")
    if speed := speed_line(data):
        lines += ["", "## Speed and memory target", "", speed]
    notes = [f"- {k}: {data[k]['note']}" for k in sorted(data) if data[k].get("note")]
    notes += [f"- {tool}: {text}" for tool, text in TOOL_NOTES.items() if any(r["tool"] == tool for r in data.values())]
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def unavailable_section(unavail: dict) -> str:
    if not unavail:
        return ""
    lines = ["", "## Tools and settings that did not run here", "",
             "The last line of the error each gave (full logs: `<work>/out/<tool>/<setting>/log.txt`).", ""]
    for key, why in sorted(unavail.items()):
        lines.append(f"- **{key}**: `{why}`")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TEXTS), figsize=(11, 4.5))
    series: dict[str, list] = {}
    fp = {}
    for r in data.values():
        if r["setting"] == "fp32":
            fp.setdefault(r["tool"], r["ppl"])
            continue
        if not bpw(r) or not r.get("ppl"):
            continue
        label = f"{r['tool']} {LABELS.get(family(r), family(r))}"
        if r["tool"] == "onecomp-orig" and "actorder" in r["setting"]:
            label += " act-order asym"
        if r["tool"] == "ours" and r["setting"].endswith("-mse"):
            label += " (full mse search)"
        if r["tool"] == "ours" and r["setting"].endswith("-minmax"):
            label += " (min-max grid)"
        series.setdefault(label, []).append(r)
    for ax, text in zip(axes, TEXTS):
        for label, rows in sorted(series.items()):
            rows = sorted(rows, key=bpw)
            style = "-o" if label.startswith("ours") else "--s"
            ax.plot([bpw(r) for r in rows], [r["ppl"][text] for r in rows], style, label=label)
        ref = fp.get("ours") or next(iter(fp.values()), None)
        if ref:
            ax.axhline(ref[text], color="grey", lw=0.8, ls=":", label="fp32")
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (stored bytes of the quantized decoder linears)")
        ax.set_ylabel("perplexity")
        ax.set_title({"kjv-gospels": "KJV gospels (in domain)", "pydoc-topics": "pydoc topics (out of domain)"}
                     .get(text, text))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M, 128 × 512 KJV calibration tokens: ppl vs bits per weight")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def regenerate(path: Path = JSON) -> str:
    data = load_results(path)
    unavail = data.pop("_unavailable", {})
    text = table(data) + unavailable_section(unavail)
    md = path.with_suffix(".md")
    md.write_text(text)
    if data:
        try:
            plot(data, path.with_suffix(".png"))
        except ImportError:
            print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
    return text


def print_ratios(data: dict) -> None:
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    for x in ratios(data):
        print(f"{x['ours']} vs {x['peer']} (bpw {x['bpw'][0]:.3f} / {x['bpw'][1]:.3f}): ppl "
              + ", ".join(f"{t} {x['ppl'][t]:.3f}" for t in TEXTS)
              + f"; time {fmt(x['time'])}; memory {fmt(x['memory'])}")
    if speed := speed_line(data):
        print(speed)


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", nargs="*", metavar="TOOL", help="create the venvs of these tools (default: all)")
    p.add_argument("--only", default="", help="comma-separated tools (ours and/or " + ", ".join(TOOLS) + ")")
    p.add_argument("--settings", default="", help="comma-separated setting names (of the chosen tools)")
    p.add_argument("--list", action="store_true", help="list tools and settings")
    p.add_argument("--fp", action="store_true", help="run only the fp32 check of each chosen environment")
    p.add_argument("--ours-from-quality", action="store_true",
                   help="take our rows from results/quality.json instead of rerunning them")
    p.add_argument("--threads", type=int, default=2, help="torch threads for every tool (default 2)")
    p.add_argument("--samples", type=int, default=FULL["samples"], help="calibration windows (protocol: 128)")
    p.add_argument("--windows", type=int, default=FULL["windows"], help="evaluation windows (protocol: 40)")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "onecomp-compare",
                   help="inputs, tool outputs and logs (outside git)")
    p.add_argument("--scratch", action="store_true",
                   help="record to <work>/compare-scratch.json instead of results/compare.json")
    p.add_argument("--table", action="store_true", help="regenerate compare.md / compare.png only")
    args = p.parse_args()

    if args.list:
        print("ours:", ", ".join(OURS))
        for tool, spec in TOOLS.items():
            print(f"{tool}:", ", ".join(spec["settings"]))
        return
    if args.setup is not None:
        for tool in args.setup or list(TOOLS):
            if tool not in TOOLS:
                p.error(f"unknown tool {tool!r}; tools: {', '.join(TOOLS)}")
            try:
                setup(tool)
            except subprocess.CalledProcessError as exc:
                print(f"setup of {tool} failed: {exc}", file=sys.stderr)
        return
    if args.table:
        print(regenerate())
        return

    tools = [t for t in args.only.split(",") if t] or ["ours", *TOOLS]
    for t in tools:
        if t != "ours" and t not in TOOLS:
            p.error(f"unknown tool {t!r}")
    wanted = {s for s in args.settings.split(",") if s}
    protocol = args.samples == FULL["samples"] and args.windows == FULL["windows"]
    out_json = JSON if protocol and not args.scratch else args.work / "compare-scratch.json"
    inputs = write_inputs(args.work, args.samples, args.windows)
    print(f"inputs: {inputs}\nmodel: {model_dir()}\nrecording to: {out_json}", flush=True)

    jobs = []
    for tool in tools:
        if args.fp:
            settings = {"fp32": {"fp32": True}}
        elif tool == "ours":  # OURS by default; any benchmarks/quality.py setting when named in --settings
            from quality import SETTINGS as QUALITY_SETTINGS

            settings = {s: {} for s in (OURS + sorted(wanted & set(QUALITY_SETTINGS) - set(OURS)))}
        else:
            settings = TOOLS[tool]["settings"]
        for name, params in settings.items():
            if wanted and name not in wanted:
                continue
            jobs.append((tool, name, params))
    for tool, name, params in jobs:
        key = f"{tool}/{name}"
        if tool == "ours" and args.ours_from_quality:
            row = ours_from_quality(name)
            if row is None:
                print(f"{key}: not in results/quality.json; run it without --ours-from-quality", file=sys.stderr)
                continue
        else:
            try:
                row = run_one(tool, name, params, inputs, args.work, args.threads)
            except RuntimeError as exc:
                print(str(exc), file=sys.stderr)
                data = load_results(out_json)
                data.setdefault("_unavailable", {})[key] = str(exc).splitlines()[-1][:400]
                out_json.parent.mkdir(parents=True, exist_ok=True)
                out_json.write_text(json.dumps(data, indent=2, sort_keys=True))
                continue
        row["protocol"] = {"samples": args.samples, "windows": args.windows, "seq_len": 512, "seed": 0}
        row["warnings"] = sanity(row) if protocol else []
        save_row(out_json, key, row)
        data = load_results(out_json)
        if key in data.get("_unavailable", {}):
            del data["_unavailable"][key]
            out_json.write_text(json.dumps(data, indent=2, sort_keys=True))
        ppl = ", ".join(f"{t} {v:.2f}" for t, v in (row.get("ppl") or {}).items())
        print(f"{key}: bpw {fmt(bpw(row), 3)}; ppl {ppl}; quant {fmt(row.get('quant_seconds'), 0)} s; "
              f"peak RSS {fmt(row.get('peak_rss_mb'), 0)} MiB; load {row.get('loadavg_start', ['–'])[0]}"
              + "".join(f"\n  WARNING: {w}" for w in row["warnings"]), flush=True)
    text = regenerate(out_json)
    if out_json == JSON:
        print(text)
    print_ratios(load_results(out_json))


if __name__ == "__main__":
    main()
