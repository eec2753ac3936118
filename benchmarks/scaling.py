"""How the layer-wise stage's cost grows: time and peak memory vs calibration samples, width and depth.

    python benchmarks/scaling.py samples        # random Llama at the embedded model's width (576), 4 blocks,
                                                #   32 / 128 / 512 calibration windows
    python benchmarks/scaling.py width          # random Llama, hidden 576 / 1024 / 2048, 2 blocks, 32 windows
    python benchmarks/scaling.py depth          # random Llama, hidden 1024, 2 / 4 / 8 blocks, 32 windows
    python benchmarks/scaling.py embedded       # the embedded model itself, 32 / 128 / 512 windows (slow:
                                                #   about 35 min for 512 windows on 2 cores)
    python benchmarks/scaling.py dp             # the embedded model's layer-wise stage, 32 windows, run three
                                                #   ways back to back: 1 process × 1 thread, 1 × 2 threads,
                                                #   torchrun 2 processes × 1 thread (gloo); time ratios, and
                                                #   whether the 2-process checkpoint equals the 1-process one
    python benchmarks/scaling.py sweep          # out of core: synthetic random Llama, hidden 2048, 8 / 16 / 32
                                                #   blocks (0.5–6 GB fp32, written to $ONECOMP_SWEEP_DIR or /tmp
                                                #   as sharded safetensors), model.stream, RTN 4-bit and GPTQ
                                                #   4-bit g128 (min-max grid) on 8 windows: peak RSS against
                                                #   the model's size
    python benchmarks/scaling.py sweep-small    # the same at hidden 512, 8 / 32 blocks
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, environment, fmt, record  # noqa: E402

SERIES = {
    "samples": [{"hidden": 576, "blocks": 4, "samples": n} for n in (32, 128, 512)],
    "width": [{"hidden": h, "blocks": 2, "samples": 32} for h in (576, 1024, 2048)],
    "depth": [{"hidden": 1024, "blocks": n, "samples": 32} for n in (2, 4, 8)],
    "embedded": [{"model": "smollm2-135m", "samples": n} for n in (32, 128, 512)],
    "dp": [],  # run_dp
    "sweep": [{"sweep": True, "hidden": 2048, "blocks": n, "quantizer": q, "samples": 8, "batch": 2}  # the ends first
              for n, q in ((8, "rtn"), (32, "rtn"), (8, "gptq"), (32, "gptq"), (16, "rtn"), (16, "gptq"))],
    # the same at hidden 512 (0.2–0.5 GB): a few minutes, light enough to run beside other work
    "sweep-small": [{"sweep": True, "hidden": 512, "blocks": n, "quantizer": q, "samples": 8, "batch": 2}
                    for q in ("rtn", "gptq") for n in (8, 32)],
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


def synthetic_llama(hidden: int, blocks: int, root: Path) -> Path:
    """A seeded random Llama written tensor by tensor as sharded safetensors (one shard per block, an
    index), never whole in memory: N(0, 0.02) weights, unit norms, tied embedding."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from onecomp.models import load_model

    path = root / f"synthetic-h{hidden}-b{blocks}"
    if (path / "model.safetensors.index.json").exists():
        return path
    tok = load_model("smollm2-135m").tokenizer
    heads, inter = hidden // 64, int(hidden * 2.75) // 64 * 64
    kv = heads // 4
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=blocks,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(path)
    tok.save_pretrained(path)
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).mul_(0.02)

    shards = [{"model.embed_tokens.weight": randn(len(tok), hidden), "model.norm.weight": torch.ones(hidden)}]
    for b in range(blocks):
        pre = f"model.layers.{b}"
        shards.append({f"{pre}.input_layernorm.weight": torch.ones(hidden),
                       f"{pre}.post_attention_layernorm.weight": torch.ones(hidden),
                       f"{pre}.self_attn.q_proj.weight": randn(hidden, hidden),
                       f"{pre}.self_attn.k_proj.weight": randn(kv * 64, hidden),
                       f"{pre}.self_attn.v_proj.weight": randn(kv * 64, hidden),
                       f"{pre}.self_attn.o_proj.weight": randn(hidden, hidden),
                       f"{pre}.mlp.gate_proj.weight": randn(inter, hidden),
                       f"{pre}.mlp.up_proj.weight": randn(inter, hidden),
                       f"{pre}.mlp.down_proj.weight": randn(hidden, inter)})
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
        shards[i] = None
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return path


def run_sweep_point(point: dict) -> dict:
    """One out-of-core point, in this process: the streamed layer-wise stage on a synthetic model."""
    import resource

    import onecomp
    from onecomp.registry import Registry

    from onecomp.pipeline.report import PeakMemory

    root = Path(os.environ.get("ONECOMP_SWEEP_DIR", "/tmp/onecomp-sweep"))
    # written by another process: what building it leaves in this one's heap would count as the run's
    subprocess.run([sys.executable, __file__, "--write", json.dumps([point["hidden"], point["blocks"], str(root)])],
                   check=True)
    model = synthetic_llama(point["hidden"], point["blocks"], root)

    class LoopPeak:
        """Peak RSS from the stage's start to its last block: the block loop without the reassembly of the
        quantized model for the checkpoint."""

        mem, peak = None, 0.0

        @onecomp.hookimpl
        def on_stage_start(self, run, stage):
            self.mem = PeakMemory().__enter__()

        @onecomp.hookimpl
        def on_block_done(self, run, block):
            self.peak = max(self.peak, self.mem.peak / 2**20)

    loop = LoopPeak()
    registry = Registry.default()
    model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    quantizer = {"rtn": {"name": "rtn", "bits": 4},
                 "gptq": {"name": "gptq", "bits": 4, "group_size": 128, "mse": False}}[point["quantizer"]]
    rss_before, load_start = resident_mb(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="onecomp-sweep-run-") as tmp:
        config = {"model": {"id": str(model), "stream": True},
                  "calibration": {"corpus": "kjv", "samples": point["samples"], "seq_len": 512, "seed": 0,
                                  "batch_size": sweep_batch(point)},
                  "plan": {"planner": "uniform", "quantizer": quantizer},
                  "evaluation": {"texts": [], "before": False},
                  "output": {"dir": str(Path(tmp) / "run")}}
        with registry.temporarily(loop, name="loop-peak"):
            stage = onecomp.run(config, registry=registry, progress=True)["stages"][0]
        loop.mem.__exit__(None, None, None)
    row = {**point, "model_mb": model_bytes / 2**20, "loop_peak_rss_mb": loop.peak, "seconds": stage["seconds"],
           "seconds_per_block": stage["seconds"] / point["blocks"], "stage_peak_rss_mb": stage["peak_rss_mb"],
           "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_before_run_mb": rss_before, "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0],
           "bits_per_weight": stage["bits"]["bits_per_weight"],
           "env": environment()}
    record("scaling", key(point), row)
    return row


def sweep_table(data: dict) -> list[str]:
    rows = sorted((v for k, v in data.items() if k.startswith("sweep-")),
                  key=lambda r: (r["hidden"], r["quantizer"], sweep_batch(r), r["blocks"]))
    if not rows:
        return []
    lines = ["", "## Out of core: depth sweep (`scaling.py sweep`)", "",
             "Synthetic random Llama models (intermediate 2.75 × hidden, head dim 64, kv heads a quarter of the heads, "
             "vocabulary 49152, tied embedding) written by the benchmark as sharded fp32 safetensors, run with `model.stream = true`, "
             "GPTQ with the min-max grid (`mse = false`), 8 calibration windows of 512 tokens run *batch* at a time (the forward's "
             "activations grow with it), no evaluation, each point in its own process. *loop peak* is the "
             "block loop's peak RSS (from the stage's start to its last block), *stage peak* adds the end of the stage, "
             "where the quantized model (codes and scales of every block) is put together for the checkpoint, and "
             "*process peak* the whole process's (it also writes the checkpoint). *growth* compares with the 8-block "
             "point of the same width, quantizer and batch. The batch-8 rows are older: they ran before the "
             "layer-wise stage released the embeddings during the block loop and before GPTQ factored H in place "
             "(hidden-2048 GPTQ at 8 blocks, batch 8: 3052 MiB before the in-place factor, 2086 after). *load*: 1-minute load average at the start → end (2 cores).", "",
             "| hidden | quantizer | batch | blocks | fp32 model (MiB) | stage time (s) | s per block | loop peak RSS (MiB) "
             "| loop peak / model | loop growth vs 8 blocks | stage peak (MiB) | process peak (MiB) "
             "| process peak / model | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["hidden"], r["quantizer"], sweep_batch(r)): r["loop_peak_rss_mb"] for r in rows if r["blocks"] == 8}
    for r in rows:
        b = base.get((r["hidden"], r["quantizer"], sweep_batch(r)))
        growth = f"{100 * (r['loop_peak_rss_mb'] / b - 1):+.1f}%" if b else "–"
        lines.append(f"| {r['hidden']} | {r['quantizer']} | {sweep_batch(r)} | {r['blocks']} | {r['model_mb']:.0f} | {r['seconds']:.0f} | "
                     f"{r['seconds_per_block']:.1f} | {r['loop_peak_rss_mb']:.0f} | "
                     f"{r['loop_peak_rss_mb'] / r['model_mb']:.3f} | {growth} | {r['stage_peak_rss_mb']:.0f} | "
                     f"{r['process_peak_rss_mb']:.0f} | {r['process_peak_rss_mb'] / r['model_mb']:.3f} | "
                     f"{r['loadavg_start']:.1f} → {r['loadavg_end']:.1f} |")
    return lines


def sweep_batch(row: dict) -> int:
    """Calibration windows per forward in a sweep point (8, the default, in points that do not say)."""
    return row.get("batch", 8)


def key(row: dict) -> str:
    if row.get("sweep"):
        batch = f"-bs{row['batch']}" if "batch" in row else ""
        return f"sweep-{row['quantizer']}-h{row['hidden']}-b{row['blocks']}-n{row['samples']}{batch}"
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


DP_WAYS = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1)}  # processes × threads each


def run_dp() -> None:
    """The embedded model's layer-wise stage three ways, back to back, each in fresh processes."""
    import torch
    from safetensors.torch import load_file

    config = {"model": {"id": "smollm2-135m"},
              "calibration": {"corpus": "kjv", "samples": 32, "seq_len": 512, "seed": 0},
              "plan": {"planner": "uniform", "quantizer": {"name": "gptq", "bits": 4, "group_size": 128}},
              "evaluation": {"texts": [], "before": False}}
    with tempfile.TemporaryDirectory(prefix="onecomp-dp-") as tmp:
        rows = {}
        for way, (procs, threads) in DP_WAYS.items():
            out = Path(tmp) / way
            cfg = Path(tmp) / f"{way}.json"
            cfg.write_text(json.dumps({**config, "output": {"dir": str(out)}}))
            launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                         str(procs)] if procs > 1 else [sys.executable])
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            load_start, t0 = os.getloadavg()[0], time.perf_counter()
            subprocess.run([*launcher, "-m", "onecomp", "run", str(cfg), "--quiet"], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            stage = json.loads((out / "report.json").read_text())["stages"][0]
            rows[way] = {"processes": procs, "threads": threads, "stage_seconds": stage["seconds"],
                         "wall_seconds": wall, "peak_rss_mb_rank0": stage["peak_rss_mb"],
                         "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0]}
            print(f"dp {way}: stage {stage['seconds']:.0f} s, whole run {wall:.0f} s", flush=True)
        one, two = (load_file(Path(tmp) / w / "01-layerwise" / "model.safetensors") for w in ("1x1", "2x1"))
        identical = one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    for way, row in rows.items():
        record("scaling", f"dp-{way}", {**row, "samples": 32, "identical_to_1x1": identical if way == "2x1" else None,
                                        "env": environment()})


def dp_table(data: dict) -> list[str]:
    rows = {k[3:]: v for k, v in data.items() if k.startswith("dp-")}
    if not {"1x1", "1x2", "2x1"} <= rows.keys():
        return []
    base, two_threads = rows["1x1"]["stage_seconds"], rows["1x2"]["stage_seconds"]
    lines = ["", "## Data-parallel calibration (`scaling.py dp`)", "",
             "The embedded model's layer-wise stage (GPTQ 4-bit g128, 32 windows of 512 tokens, batch 8), run "
             "back to back in fresh processes on the same 2-core machine. *speed-up* is the 1 × 1 stage time over "
             "the row's. 2 × 1 is `torchrun --standalone --nproc-per-node 2 -m onecomp run` (gloo).", "",
             "| processes × threads | stage (s) | whole run (s) | speed-up vs 1 × 1 | vs 1 × 2 | peak RSS rank 0 (MiB) "
             "| checkpoint = 1 × 1 | load |", "|---|---|---|---|---|---|---|---|"]
    for way in DP_WAYS:
        r = rows[way]
        same = {True: "bit-identical", False: "differs", None: "–"}[r.get("identical_to_1x1")]
        lines.append(f"| {r['processes']} × {r['threads']} | {r['stage_seconds']:.0f} | {r['wall_seconds']:.0f} | "
                     f"{base / r['stage_seconds']:.2f} | {two_threads / r['stage_seconds']:.2f} | "
                     f"{r['peak_rss_mb_rank0']:.0f} | {same} | {r['loadavg_start']:.1f} → {r['loadavg_end']:.1f} |")
    return lines


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
    series = {k: v for k, v in data.items() if not k.startswith(("dp-", "sweep-"))}
    for k in sorted(series, key=lambda k: (data[k].get("hidden", 576), data[k].get("blocks", 30),
                                          data[k]["samples"])):
        r = data[k]
        hidden, blocks, model = r.get("hidden", 576), r.get("blocks", 30), model_mb(r)
        lines.append(f"| {k} | {hidden} | {blocks} | {r['samples']} | {fmt(r.get('weights'))} | "
                     f"{fmt(r['seconds'], 0)} | {fmt(r['seconds'] / blocks, 1)} | "
                     f"{fmt(r['samples'] * 512 * hidden * 4 / 2**20, 0)} | {fmt(r['peak_rss_mb'], 0)} | "
                     f"{fmt(model, 0)} | {fmt(r['peak_rss_mb'] - model, 0)} | {block_memory(r)} |")
    lines += dp_table(data) + sweep_table(data)
    text = "\n".join(lines) + "\n"
    (RESULTS / "scaling.md").write_text(text)
    return text


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("series", nargs="*", help="one or more of: " + ", ".join(SERIES))
    p.add_argument("--table", action="store_true")
    p.add_argument("--point", help=argparse.SUPPRESS)  # internal: run one point (JSON) in this process
    p.add_argument("--write", help=argparse.SUPPRESS)  # internal: write a synthetic model (JSON arguments)
    args = p.parse_args()
    unknown = [n for n in args.series if n not in SERIES]
    if unknown:
        p.error(f"unknown series {', '.join(unknown)}; choose from {', '.join(SERIES)}")
    if args.write:
        hidden, blocks, root = json.loads(args.write)
        synthetic_llama(hidden, blocks, Path(root))
        return
    if args.point:
        point = json.loads(args.point)
        (run_sweep_point if point.get("sweep") else run_point)(point)
        return
    for name in args.series:
        if name == "dp":
            run_dp()
            continue
        for point in SERIES[name]:
            # one process per point: a peak RSS is then that point's alone, not what earlier ones left behind
            subprocess.run([sys.executable, __file__, "--point", json.dumps(point)], check=True)
            row = json.loads((RESULTS / "scaling.json").read_text())[key(point)]
            peak = row.get("peak_rss_mb", row.get("stage_peak_rss_mb"))
            print(f"{key(point)}: {row['seconds']:.0f} s, peak {peak:.0f} MiB", flush=True)
    print(table())


if __name__ == "__main__":
    main()
