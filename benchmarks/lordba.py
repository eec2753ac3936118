"""LoRDBA against fp16 LoRA of the same rank on the GPTQ 3-bit g128 pivot (docs/protocol.md).

    python benchmarks/lordba.py pivot          # onecomp run: the pivot (01-layerwise), once
    python benchmarks/lordba.py train binary   # the pivot's run copied, the lordba refiner appended
    python benchmarks/lordba.py train fp16     # the same steps and windows with fp16 LoRA factors
    python benchmarks/lordba.py latency        # prefill at 512 tokens: base alone vs base + each adapter
    python benchmarks/lordba.py --table        # regenerate results/lordba.md from results/lordba.json

Run directories go to $LORDBA_RUNS (default /tmp/lordba-runs). Rows land in results/lordba.json:
perplexity on both texts, adapter bytes, stage time and peak memory, the refiner's losses and the
sign flip rate; ``latency`` times the same 512-token window on one loaded pivot with and without
each adapter, interleaved, and reports medians and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import PROTOCOL, RESULTS, TEXTS, environment, fmt, record  # noqa: E402

RUNS = Path(os.environ.get("LORDBA_RUNS", "/tmp/lordba-runs"))
PIVOT = {"model": {"id": "smollm2-135m"}, **PROTOCOL,
         "plan": {"planner": "uniform", "quantizer": {"name": "gptq", "bits": 3, "group_size": 128}}}
# 16 calibration windows × 3 epochs in batches of 2 (24 steps), the same for both kinds
TRAIN = {"name": "lordba", "rank": 16, "samples": 16, "batch_size": 2, "epochs": 3, "lr": 1e-2,
         "lr_discrete": 1e-2}
SIGNLOCK = {"name": "signlock", "strength": 1e-3, "epsilon": 0.05}


def pivot_config() -> dict:
    return {**PIVOT, "output": {"dir": str(RUNS / "pivot")}}


def train_config(kind: str) -> dict:
    refiner = {**TRAIN, "kind": kind, "regularizers": [SIGNLOCK] if kind == "binary" else []}
    return {**PIVOT, "refiners": [refiner], "output": {"dir": str(RUNS / kind)}}


def cmd_pivot(args) -> None:
    import onecomp

    result = onecomp.run(pivot_config(), progress=True)
    stage = result["stages"][0]
    record("lordba", "pivot gptq-w3g128", {"ppl": stage["ppl"], "seconds": stage["seconds"],
                                           "bits_per_weight": stage["bits"]["bits_per_weight"],
                                           "config": pivot_config(), "env": environment()})


def cmd_train(args) -> None:
    import onecomp

    out = RUNS / args.kind
    if not (out / "01-layerwise" / "onecomp.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(RUNS / "pivot", out)  # the same pivot: the run extends with the refiner's stage
    result = onecomp.run(train_config(args.kind), progress=True)
    stage = result["stages"][-1]
    details = json.loads((out / "reports" / "02-lordba.json").read_text())["details"]
    record("lordba", f"gptq-w3g128 + {args.kind}", {
        "ppl": stage["ppl"], "seconds": stage["seconds"], "peak_rss_mb": stage["peak_rss_mb"],
        "adapter_bytes": details["adapter_bytes"], "fp16_lora_bytes": details["fp16_lora_bytes"],
        "layers": details["layers"], "loss_pivot": details["loss_pivot"], "loss_before": details["loss_before"],
        "loss_after": details["loss_after"], "best_epoch": details["best_epoch"], "epochs": details["epochs"],
        "regularizers": details["regularizers"], "windows": details["windows"], "refiner": train_config(args.kind)[
            "refiners"][0], "env": environment()})


def cmd_latency(args) -> None:
    import torch

    import onecomp
    from onecomp.calibration import leading_windows, load_text, tokenize
    from onecomp.checkpoint.adapters import attach_adapters, detach
    from onecomp.models import load_model

    torch.set_num_threads(2)
    tok = load_model("smollm2-135m").tokenizer
    ids = leading_windows(tokenize(tok, load_text("kjv-gospels")), 1, 512)
    model = onecomp.load(RUNS / "pivot" / "01-layerwise")
    kinds = [k for k in ("binary", "fp16") if (RUNS / k / "02-lordba" / "adapters" / "lordba").exists()]

    def forward() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        return time.perf_counter() - t0

    def use(kind):
        detach(model)
        if kind != "base":
            attach_adapters(model, None, [RUNS / kind / "02-lordba" / "adapters" / "lordba"])

    times = {k: [] for k in ["base", *kinds]}
    for k in times:  # warm-up: dequantized weight caches, kernels
        use(k)
        forward(), forward()
    for _ in range(args.rounds):
        for k in times:
            use(k)
            times[k].append(forward())
    median = {k: statistics.median(v) for k, v in times.items()}
    record("lordba", "prefill latency 512 tokens", {
        "median_seconds": median, "rounds": args.rounds,
        "overhead": {k: median[k] / median["base"] - 1 for k in kinds}, "env": environment()})


def table() -> str:
    data = json.loads((RESULTS / "lordba.json").read_text())
    pivot = data.get("pivot gptq-w3g128", {})
    lat = data.get("prefill latency 512 tokens", {})
    rows = ["| setting | " + " | ".join(f"ppl {t}" for t in TEXTS) +
            " | adapter bytes | vs fp16 LoRA | stage s | stage peak MiB | KL pivot → init → trained | "
            "sign flips | prefill overhead |",
            "|---|" + "---|" * (len(TEXTS) + 7)]
    if pivot:
        rows.append("| GPTQ w3g128 pivot | " + " | ".join(fmt(pivot["ppl"][t]) for t in TEXTS) +
                    " | – | – | " + fmt(pivot["seconds"], 0) + " | – | – | – | – |")
    peaks = {}
    for kind in ("binary", "fp16"):
        row = data.get(f"gptq-w3g128 + {kind}")
        if not row:
            continue
        peaks[kind] = row["peak_rss_mb"]
        flip = row["regularizers"].get("signlock", {}).get("flip_rate")
        over = lat.get("overhead", {}).get(kind)
        name = "+ LoRDBA r=16" if kind == "binary" else "+ fp16 LoRA r=16"
        rows.append(f"| {name} | " + " | ".join(fmt(row["ppl"][t]) for t in TEXTS) +
                    f" | {row['adapter_bytes']:,} | {row['fp16_lora_bytes'] / row['adapter_bytes']:.2f}× smaller"
                    f" | {fmt(row['seconds'], 0)} | {fmt(row['peak_rss_mb'], 0)} | "
                    f"{row['loss_pivot']:.4f} → {row['loss_before']:.4f} → {row['loss_after']:.4f} | "
                    f"{'–' if flip is None else f'{100 * flip:.2f}%'} | "
                    f"{'–' if over is None else f'{100 * over:+.1f}%'} |")
    notes = [f"Adapters on all {data.get('gptq-w3g128 + binary', {}).get('layers', '–')} decoder linear layers; "
             f"training: {json.dumps(TRAIN)} on the first calibration windows (the same for both kinds), "
             "objective mean token KL(fp ‖ adapted); LoRDBA with signlock "
             f"{json.dumps(SIGNLOCK)}. Produced by `python benchmarks/lordba.py` (see its docstring)."]
    if len(peaks) == 2:
        notes.append(f"Training peak memory (whole process, teacher included): LoRDBA / fp16 LoRA = "
                     f"{peaks['binary'] / peaks['fp16']:.3f}.")
    if lat:
        med = lat["median_seconds"]
        notes.append("Prefill of one 512-token window, median of " + str(lat["rounds"]) + " interleaved rounds: " +
                     ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in med.items()) + ".")
    return "# LoRDBA vs fp16 LoRA on the GPTQ 3-bit g128 pivot\n\n" + "\n".join(rows) + "\n\n" + \
        "\n\n".join(notes) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", nargs="?", choices=["pivot", "train", "latency"])
    ap.add_argument("kind", nargs="?", choices=["binary", "fp16"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if args.step == "train" and not args.kind:
        ap.error("train needs a kind: binary or fp16")
    if args.step:
        {"pivot": cmd_pivot, "train": cmd_train, "latency": cmd_latency}[args.step](args)
    (RESULTS / "lordba.md").write_text(table())


if __name__ == "__main__":
    main()
