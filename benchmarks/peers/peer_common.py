"""Shared by the peer runners: inputs, fp32 model, perplexity, bits per weight, the result line, and the
evaluation of a peer's saved checkpoint by OneComp's importer.

Runs inside each peer's own virtual environment, so it imports only torch, transformers and
safetensors, never our onecomp (the original-onecomp environment has its own package of that name):
a saved checkpoint is evaluated by ``saved_eval.py`` in a subprocess of the interpreter that has our
onecomp (the one the venv was made from, or ``$ONECOMP_PYTHON``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import struct
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

#: the quantized decoder linears of a Llama-style model (not the embeddings, not lm_head)
DECODER_LINEAR = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.")


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True, help="fp32 HF directory of the embedded model")
    p.add_argument("--inputs", required=True, help="safetensors file with calib and eval/<text> windows")
    p.add_argument("--out", required=True, help="directory for the tool's saved output")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--setting", required=True, help="JSON: the setting (bits, group_size, ...) or {'fp32': true}")
    p.add_argument("--name", required=True, help="the setting's name, echoed in the result")
    args = p.parse_args()
    args.setting = json.loads(args.setting)
    return args


class Run:
    """Threads, load averages, timings and the one JSON line a runner prints."""

    def __init__(self, tool: str, args: argparse.Namespace, dists: list[str]):
        torch.set_num_threads(args.threads)
        self.tool, self.args, self.dists = tool, args, dists
        self.row = {"tool": tool, "setting": args.name, "params": args.setting, "threads": torch.get_num_threads(),
                    "loadavg_start": list(os.getloadavg())}
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def inputs(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from safetensors.torch import load_file

        tensors = load_file(self.args.inputs)
        evals = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("eval/")}
        return tensors["calib"], evals

    def fp_model(self):
        return load_fp32(self.args.model)

    def timed(self, fn):
        """Run ``fn`` (the quantization only), recording wall time and the peak RSS so far."""
        t0 = time.perf_counter()
        out = fn()
        self.row["quant_seconds"] = time.perf_counter() - t0
        self.row["peak_rss_after_quant_mb"] = peak_rss_mb()
        return out

    def evaluate(self, model, evals: dict[str, torch.Tensor]) -> None:
        t0 = time.perf_counter()
        self.row["ppl"] = {text: perplexity(model, w) for text, w in evals.items()}
        self.row["eval_seconds"] = time.perf_counter() - t0

    def evaluate_saved(self, saved: Path) -> None:
        """The ppl of the checkpoint the tool saved under ``saved``, read by ``onecomp.load``."""
        result = evaluate_saved(saved, self.args.inputs, self.args.threads)
        self.row["ppl"] = result.pop("ppl")
        self.row["eval_seconds"] = result["eval_seconds"]
        self.row["saved_eval"] = result

    def finish(self, **extra) -> None:
        self.row.update(extra)
        self.row["loadavg_end"] = list(os.getloadavg())
        self.row["peak_rss_mb_self"] = peak_rss_mb()
        self.row["versions"] = versions(["torch", "transformers", *self.dists])
        self.row["python"] = sys.version.split()[0]
        print("RESULT " + json.dumps(self.row), flush=True)


def start(tool: str, description: str, dists: list[str]):
    """Arguments, threads and inputs of a runner; an fp32 check is evaluated and reported here.

    Returns ``(run, calib, evals)`` for a quantization setting, ``None`` when the fp32 check is done."""
    run = Run(tool, parse_args(description), dists)
    calib, evals = run.inputs()
    if run.args.setting.get("fp32"):
        run.evaluate(run.fp_model(), evals)
        run.finish()
        return None
    return run, calib, evals


def load_fp32(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    model.config.use_cache = False
    return model


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    """exp(mean over windows of ``model(ids, labels=ids).loss``), one window at a time, fp32."""
    device = next(model.parameters()).device
    losses = []
    for i, w in enumerate(windows):
        ids = w[None].to(device)
        losses.append(model(input_ids=ids, labels=ids, use_cache=False).loss.float().item())
        if (i + 1) % 10 == 0:
            print(f"ppl: {i + 1}/{len(windows)} windows", file=sys.stderr, flush=True)
    return math.exp(sum(losses) / len(losses))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def versions(dists: list[str]) -> dict:
    out = {}
    for d in dists:
        try:
            out[d] = version(d)
        except PackageNotFoundError:
            out[d] = None
    return out


def safetensors_entries(path: Path) -> dict[str, dict]:
    """name -> {dtype, shape, bytes} from a safetensors header (the data is not read)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: {"dtype": v["dtype"], "shape": v["shape"], "bytes": v["data_offsets"][1] - v["data_offsets"][0]}
            for k, v in header.items()}


def decoder_linear_weights(model_dir: str) -> int:
    """Number of weights of the decoder linears in the fp model (the bpw denominator)."""
    n = 0
    for f in Path(model_dir).glob("*.safetensors"):
        for k, e in safetensors_entries(f).items():
            if DECODER_LINEAR.search(k) and k.endswith(".weight"):
                n += math.prod(e["shape"])
    return n


def stored_bits(out_dir: Path, model_dir: str) -> dict:
    """Bits per weight: every stored tensor of the quantized decoder linears (codes, scales, zeros,
    g_idx, shape tensors, ...) from the saved safetensors files, over the fp model's decoder weights."""
    by_kind: dict[str, int] = {}
    files = sorted(Path(out_dir).rglob("*.safetensors"))
    for f in files:
        for k, e in safetensors_entries(f).items():
            if DECODER_LINEAR.search(k):
                kind = k.rsplit(".", 1)[1]
                by_kind[kind] = by_kind.get(kind, 0) + e["bytes"]
    weights = decoder_linear_weights(model_dir)
    total = sum(by_kind.values())
    return {"bits_per_weight": 8 * total / weights if weights and total else None, "quantized_weights": weights,
            "stored_bytes": total, "bytes_by_tensor": by_kind, "files": [str(f.relative_to(out_dir)) for f in files]}


def evaluate_saved(saved: Path, inputs, threads: int) -> dict:
    """Run ``saved_eval.py`` on a saved checkpoint: its ppl on the ``eval/<text>`` windows of ``inputs``
    through ``onecomp.load``, plus which importer read it and its timings."""
    python = os.environ.get("ONECOMP_PYTHON") or getattr(sys, "_base_executable", None) or sys.executable
    cmd = [python, str(Path(__file__).resolve().parent / "saved_eval.py"), "--checkpoint", str(saved),
           "--inputs", str(inputs), "--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"evaluating {saved} with onecomp.load failed (exit {proc.returncode}): {' '.join(cmd)}")
    return json.loads(lines[-1][len("RESULT "):]) | {"python": python}
