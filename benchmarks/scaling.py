"""How the layer-wise stage's cost grows: time and peak memory vs calibration samples, width and depth.

    python benchmarks/scaling.py samples        # random Llama at the embedded model's width (576), 4 blocks,
                                                #   32 / 128 / 512 calibration windows
    python benchmarks/scaling.py width          # random Llama, hidden 576 / 1024 / 2048, 2 blocks, 32 windows
    python benchmarks/scaling.py depth          # random Llama, hidden 1024, 2 / 4 / 8 blocks, 32 windows
    python benchmarks/scaling.py embedded       # the embedded model itself, 32 / 128 / 512 windows (slow:
                                                #   about 35 min for 512 windows on 2 cores)
    python benchmarks/scaling.py --table        # regenerate results/scaling.md only

GPTQ 4-bit g128 (the plugin's defaults), calibration on KJV with seq_len 512, no
evaluation: only the layer-wise stage is timed. Rows go to results/scaling.json.
Random models use the embedded tokenizer's vocabulary; their weights are seeded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, environment, fmt, record  # noqa: E402

SERIES = {
    "samples": [{"hidden": 576, "blocks": 4, "samples": n} for n in (32, 128, 512)],
    "width": [{"hidden": h, "blocks": 2, "samples": 32} for h in (576, 1024, 2048)],
    "depth": [{"hidden": 1024, "blocks": n, "samples": 32} for n in (2, 4, 8)],
    "embedded": [{"model": "smollm2-135m", "samples": n} for n in (32, 128, 512)],
}


def random_llama(hidden: int, blocks: int, root: Path) -> Path:
    """A seeded random Llama (Llama proportions: intermediate ≈ 2.75 × hidden, head dim 64) as an HF dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from onecomp.models import load_model

    tok = load_model("smollm2-135m").tokenizer
    heads = hidden // 64
    kv_heads = heads // 3 if heads % 3 == 0 else heads // 4  # must divide heads: 9 → 3, 16 → 4, 32 → 8
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                      num_hidden_layers=blocks, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=1024, tie_word_embeddings=True)
    torch.manual_seed(0)
    path = root / f"llama-h{hidden}-b{blocks}"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def key(row: dict) -> str:
    if "model" in row:
        return f"{row['model']}-n{row['samples']}"
    return f"llama-h{row['hidden']}-b{row['blocks']}-n{row['samples']}"


def resident_mb() -> float:
    """This process's resident memory now (not its peak), from /proc/self/statm."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_point(point: dict) -> dict:
    import onecomp
    from onecomp.registry import Registry

    after_blocks = []

    class BlockMemory:
        """Resident memory at the end of every block: what the stage keeps as it goes."""

        @onecomp.hookimpl
        def on_block_done(self, run, block):
            after_blocks.append(round(resident_mb(), 1))

    load_start = os.getloadavg()[0]
    registry = Registry.default()
    with tempfile.TemporaryDirectory(prefix="onecomp-scaling-") as tmp, registry.temporarily(BlockMemory()):
        model = point.get("model") or str(random_llama(point["hidden"], point["blocks"], Path(tmp)))
        config = {"model": {"id": model},
                  "calibration": {"corpus": "kjv", "samples": point["samples"], "seq_len": 512, "seed": 0},
                  "plan": {"planner": "uniform", "quantizer": {"name": "gptq", "bits": 4, "group_size": 128}},
                  "evaluation": {"texts": [], "before": False},
                  "output": {"dir": str(Path(tmp) / "run")}}
        stage = onecomp.run(config, registry=registry, progress=True)["stages"][0]
    import resource

    row = {**point, "weights": stage["bits"]["quantized_weights"], "seconds": stage["seconds"],
           "peak_rss_mb": stage["peak_rss_mb"], "process_peak_rss_mb": resource.getrusage(0).ru_maxrss / 1024,
           "bits_per_weight": stage["bits"]["bits_per_weight"], "rss_after_blocks_mb": after_blocks,
           "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0],
           "env": environment()}
    record("scaling", key(point), row)
    return row


def model_mb(row: dict) -> float:
    """fp32 size of the model: its decoder linear layers plus the (tied) embedding, vocabulary 49152."""
    return (row["weights"] + 49152 * row.get("hidden", 576)) * 4 / 2**20


def block_memory(row: dict) -> str:
    """The resident-memory-per-block cells (blank for rows recorded before they were measured)."""
    after = row.get("rss_after_blocks_mb") or []
    if len(after) < 2:
        return "– | – | – | –"
    growth = (after[-1] - after[0]) / (len(after) - 1)
    codes = row["weights"] * row["bits_per_weight"] / 8 / len(after) / 2**20
    return (f"{after[0]:.0f} → {after[-1]:.0f} | {growth:.1f} | {codes:.1f} | "
            f"{row['loadavg_start']:.1f} → {row['loadavg_end']:.1f}")


def table() -> str:
    path = RESULTS / "scaling.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    lines = ["# Scaling of the layer-wise stage (GPTQ 4-bit g128)", "",
             "Generated by `benchmarks/scaling.py` from `scaling.json`. Time is the layer-wise stage's wall time; "
             "peak RSS is the whole process (model, teacher-free). Random models: seeded Llama, vocabulary 49152.",
             "Each point runs in its own process. *activations* is one copy of the block inputs (windows × 512 "
             "tokens × hidden × 4 bytes). The default layer-by-layer calibration also keeps one such copy of the "
             "attention output and up to `calibration.keep_mb` (256 when these points ran; 512 since) MiB of down_proj inputs; these, and the "
             "model, are what grow with the calibration size and the width. *peak RSS − model* takes out the fp32 "
             "model (decoder linears plus the tied embedding). Random points "
             "build and save their model in the same process first.",
             "*resident after block 1 → last*: the process's resident memory (not its peak) when the first and "
             "the last block are done; *growth per block* is their difference over the blocks in between, beside "
             "*codes per block*, the stored bytes (packed codes and scales) of one quantized block, which the "
             "quantized layers keep in memory. *load*: 1-minute load average at the start → end (2 cores).",
             "", "| point | hidden | blocks | calibration windows | quantized weights | time (s) | s per block "
             "| activations (MiB) | peak RSS (MiB) | fp32 model (MiB) | peak RSS − model (MiB) "
             "| resident after block 1 → last (MiB) | growth per block (MiB) | codes per block (MiB) | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in sorted(data, key=lambda k: (data[k].get("hidden", 576), data[k].get("blocks", 30),
                                          data[k]["samples"])):
        r = data[k]
        hidden, blocks, model = r.get("hidden", 576), r.get("blocks", 30), model_mb(r)
        lines.append(f"| {k} | {hidden} | {blocks} | {r['samples']} | {fmt(r.get('weights'))} | "
                     f"{fmt(r['seconds'], 0)} | {fmt(r['seconds'] / blocks, 1)} | "
                     f"{fmt(r['samples'] * 512 * hidden * 4 / 2**20, 0)} | {fmt(r['peak_rss_mb'], 0)} | "
                     f"{fmt(model, 0)} | {fmt(r['peak_rss_mb'] - model, 0)} | {block_memory(r)} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / "scaling.md").write_text(text)
    return text


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("series", nargs="*", help="one or more of: " + ", ".join(SERIES))
    p.add_argument("--table", action="store_true")
    p.add_argument("--point", help=argparse.SUPPRESS)  # internal: run one point (JSON) in this process
    args = p.parse_args()
    unknown = [n for n in args.series if n not in SERIES]
    if unknown:
        p.error(f"unknown series {', '.join(unknown)}; choose from {', '.join(SERIES)}")
    if args.point:
        run_point(json.loads(args.point))
        return
    for name in args.series:
        for point in SERIES[name]:
            # one process per point: a peak RSS is then that point's alone, not what earlier ones left behind
            subprocess.run([sys.executable, __file__, "--point", json.dumps(point)], check=True)
            row = json.loads((RESULTS / "scaling.json").read_text())[key(point)]
            print(f"{key(point)}: {row['seconds']:.0f} s, peak {row['peak_rss_mb']:.0f} MiB", flush=True)
    print(table())


if __name__ == "__main__":
    main()
