"""Inference with a compressed checkpoint against the dense model it came from, in one run.

    python benchmarks/inference.py [--checkpoint runs/default/01-layerwise] [--threads 2]

Rows, each measured in a fresh process (so resident memory is the process's own), one after the
other: the fp32 and the bf16 dense model (the embedded SmolLM2-135M), and the checkpoint through ``onecomp.load`` (backend
``auto``). Per row: resident memory added by loading (RSS after loading and one 8-token forward
pass, which touches every weight, minus RSS before, imports and the tokenizer loaded first),
prefill latency of 512 tokens, greedy decode tokens/s over 128 new tokens with the KV cache, and
which kernel ran each quantized module. Then perplexity on the protocol's texts through the kernels
and through the reference path (dequantize, then matmul), and a per-layer microbenchmark of the
packed int4 kernel against the dense matmuls. On CUDA it adds the Triton kernels' table
(``onecomp_triton.bench``) and fp16 decode; on CPU it records that it skipped them.
Results: ``benchmarks/results/inference.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, TEXTS, environment  # noqa: E402

SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096)]  # (out, in)
PROMPT = "In the beginning God created the heaven and the earth. And the earth was without form, and void;"


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def best(f, repeat: int) -> float:
    """The median of ``repeat`` timed calls of ``f`` (seconds), after one warm-up call."""
    f()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---------------------------------------------------------------- one row, in its own process


def measure_row(kind: str, checkpoint: str, threads: int, new_tokens: int, prefill: int) -> dict:
    import gc

    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (imports before the baseline)

    import onecomp
    from onecomp.builtin.torch_backend import set_mmap_threshold
    from onecomp.kernels import kernel_summary
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onecomp.testing.models import make_tiny_llama

    torch.set_num_threads(threads)
    onecomp.Registry.default().names("backend")
    set_mmap_threshold(1)  # the torch backend's allocator setting, in every row alike
    make_tiny_llama()(input_ids=torch.tensor([[1, 2]]))  # the model code paths run once before the baseline
    dense = dense_dir()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint if kind == "checkpoint" else dense)  # before the baseline
    gc.collect()
    before = rss_mib()
    t = time.perf_counter()
    if kind == "checkpoint":
        model = onecomp.load(checkpoint)
    else:  # what load_model("smollm2-135m", kind) does, without loading a second tokenizer inside the measurement
        model = AutoModelForCausalLM.from_pretrained(str(dense), dtype=getattr(torch, kind)).eval()
    load_seconds = time.perf_counter() - t
    ids = tokenizer(PROMPT * 40, return_tensors="pt").input_ids[:, :prefill]
    with torch.no_grad():
        model(input_ids=ids[:, :8], use_cache=False)  # every weight touched: lazily mapped files count too
        gc.collect()
        added = rss_mib() - before
        prefill_s = best(lambda: model(input_ids=ids, use_cache=False), 3)
        prompt = tokenizer(PROMPT, return_tensors="pt").input_ids

        def decode(n):
            return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                                  pad_token_id=tokenizer.eos_token_id)

        decode(4)  # warm-up
        t = time.perf_counter()
        out = decode(new_tokens)
        decode_s = time.perf_counter() - t
    assert out.shape[1] - prompt.shape[1] == new_tokens
    return {"kind": kind, "rss_added_mib": added, "load_seconds": load_seconds, "prefill_ms": prefill_s * 1e3,
            "prefill_tokens": ids.shape[1], "decode_tokens_per_s": new_tokens / decode_s, "new_tokens": new_tokens,
            "kernels": kernel_summary(model), "text": tokenizer.decode(out[0, prompt.shape[1]:])[:120]}


def dense_dir() -> Path:
    """The fp32 HF directory the embedded GGUF model is converted into (converted once if missing)."""
    from onecomp.models import load_model
    from onecomp.models.load import EMBEDDED_MODELS
    from onecomp.resources import cache_dir

    stem = Path(EMBEDDED_MODELS["smollm2-135m"][1]).stem
    found = sorted((cache_dir() / "gguf").glob(f"{stem}-*/config.json"))
    if not found:
        load_model("smollm2-135m")
        found = sorted((cache_dir() / "gguf").glob(f"{stem}-*/config.json"))
    return found[-1].parent


def perplexities(checkpoint: str, windows: int, threads: int) -> dict:
    """Perplexity per text through the kernels (``onecomp.load``) and the reference path."""
    import torch
    from transformers import AutoTokenizer

    import onecomp
    from onecomp.checkpoint import load
    from onecomp.evaluation import eval_windows, perplexity

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    out = {}
    for label, model in (("kernels", onecomp.load(checkpoint)), ("reference", load(checkpoint))):
        out[label] = {t: perplexity(model, eval_windows(tokenizer, t, windows, 512)) for t in TEXTS}
        del model
    out["relative_difference"] = {t: out["kernels"][t] / out["reference"][t] - 1 for t in TEXTS}
    out["windows"] = windows
    return out


def microbenchmark(threads: int) -> list[dict]:
    """Per layer, one token (decode): fp32 and bf16 dense matmuls against the int4 kernel module."""
    import torch

    from onecomp import Registry
    from onecomp.builtin.cpu_kernels import Int4Linear

    torch.set_num_threads(threads)
    fmt = Registry.default().get("format", "gptq").from_dict({"bits": 4, "group_size": 128})
    gen = torch.Generator().manual_seed(0)
    rows = []
    for N, K in SHAPES:
        stored = fmt.pack(fmt.example((N, K), gen), (N, K))
        kernel = Int4Linear.build(fmt, stored, (N, K), None)
        W = fmt.dequantize(stored, (N, K))
        Wb = W.bfloat16()
        x = torch.randn(1, K, generator=gen)
        xb = x.bfloat16()
        repeat = 50 if N * K < 4e6 else 20
        with torch.no_grad():
            t32 = best(lambda: torch.nn.functional.linear(x, W), repeat)
            t16 = best(lambda: torch.nn.functional.linear(xb, Wb), repeat)
            t4 = best(lambda: kernel(x), repeat)
            err = ((kernel(x) - x @ W.T).abs().max() / (x @ W.T).abs().max()).item()
        rows.append({"shape": [N, K], "fp32_us": t32 * 1e6, "bf16_us": t16 * 1e6, "int4_us": t4 * 1e6,
                     "fp32_over_int4": t32 / t4, "bf16_over_int4": t16 / t4, "max_rel_err": err})
        del W, Wb, kernel
    return rows


def cuda_section(checkpoint: str, new_tokens: int) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine: the Triton kernel rows and fp16 GPU decode were not run"}
    import io
    from contextlib import redirect_stdout

    import onecomp
    from onecomp.models import load_model

    out = {"device": torch.cuda.get_device_name()}
    try:
        from onecomp_triton.bench import run as triton_bench

        buf = io.StringIO()
        with redirect_stdout(buf):
            triton_bench([])
        out["triton_kernels_md"] = buf.getvalue()
    except ImportError:
        out["triton_kernels_md"] = "onecomp-triton is not installed"
    loaded = load_model("smollm2-135m", "float16")
    prompt = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids.cuda()
    for label, model in (("fp16", loaded.model.cuda()),
                         ("quantized", onecomp.load(checkpoint, backend="auto", dtype=torch.float16).cuda())):
        with torch.no_grad():
            def go():
                model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               use_cache=True)
                torch.cuda.synchronize()
            out[f"decode_tokens_per_s_{label}"] = new_tokens / best(go, 1)
    out["decode_ratio"] = out["decode_tokens_per_s_quantized"] / out["decode_tokens_per_s_fp16"]
    return out


# ---------------------------------------------------------------- the run


def run_child(args, kind: str, new_tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--row", kind, "--checkpoint", args.checkpoint, "--threads", str(args.threads),
           "--new-tokens", str(new_tokens), "--prefill", str(args.prefill)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"row {kind} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def markdown(r: dict) -> str:
    rows = r["rows"]
    fp32, bf16, q = rows["float32"], rows["bfloat16"], rows["checkpoint"]
    env = r["environment"]
    lines = [
        "# Inference: a 4-bit checkpoint against the dense model it came from",
        "",
        f"Generated by `benchmarks/inference.py` on {env['date']}: {env['machine']}, {r['threads']} threads, "
        f"torch {env['torch']}. Checkpoint `{r['checkpoint']}` ({r['checkpoint_note']}). "
        "All figures are from one run, rows measured back to back, each row in a fresh process; "
        "compare them as ratios, not as absolute times." + (f" {r['note']}" if r.get("note") else "")
        + (f" 1-minute load average {r['loadavg'][0]:.1f} at the start, {r['loadavg'][1]:.1f} at the end (2 cores)."
           if r.get("loadavg") else ""),
        "",
        f"| model | resident memory added by loading (MiB, after one 8-token forward) | vs fp32 | prefill "
        f"{fp32['prefill_tokens']} tokens (ms) | new tokens (greedy) | decode tokens/s | vs fp32 | vs bf16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, row in (("fp32 dense", fp32), ("bf16 dense", bf16), ("4-bit checkpoint, `onecomp.load`", q)):
        lines.append(f"| {label} | {row['rss_added_mib']:.0f} | {row['rss_added_mib'] / fp32['rss_added_mib']:.2f}x | "
                     f"{row['prefill_ms']:.0f} | {row['new_tokens']} | {row['decode_tokens_per_s']:.2f} | "
                     f"{row['decode_tokens_per_s'] / fp32['decode_tokens_per_s']:.2f}x | "
                     f"{row['decode_tokens_per_s'] / bf16['decode_tokens_per_s']:.2f}x |")
    lines += ["", "Kernels of the checkpoint's quantized modules: " +
              ", ".join(f"{k} × {v}" for k, v in q["kernels"].items()) + ".", ""]
    ppl = r["perplexity"]
    lines += [f"Perplexity ({ppl['windows']} windows of 512 tokens per text), kernels against the reference path "
              "(dequantize, then fp32 matmul):", "",
              "| text | kernels | reference | difference |", "|---|---|---|---|"]
    for t in TEXTS:
        lines.append(f"| {t} | {ppl['kernels'][t]:.4f} | {ppl['reference'][t]:.4f} | "
                     f"{100 * ppl['relative_difference'][t]:+.3f}% |")
    lines += ["", "Per layer, one token (decode), µs per call (median):", "",
              "| layer (out × in) | fp32 dense | bf16 dense | packed int4 | fp32 / int4 | bf16 / int4 | max rel err |",
              "|---|---|---|---|---|---|---|"]
    for m in r["microbenchmark"]:
        lines.append(f"| {m['shape'][0]} × {m['shape'][1]} | {m['fp32_us']:.0f} | {m['bf16_us']:.0f} | "
                     f"{m['int4_us']:.0f} | {m['fp32_over_int4']:.2f}x | {m['bf16_over_int4']:.2f}x | "
                     f"{m['max_rel_err']:.1e} |")
    cuda = r["cuda"]
    lines += ["", "## CUDA", ""]
    if "skipped" in cuda:
        lines.append(f"Skipped: {cuda['skipped']}.")
    else:
        lines += [cuda.get("triton_kernels_md", ""), "",
                  f"Decode on {cuda['device']}: quantized {cuda['decode_tokens_per_s_quantized']:.1f} tokens/s, "
                  f"fp16 {cuda['decode_tokens_per_s_fp16']:.1f} ({cuda['decode_ratio']:.2f}x)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="runs/default/01-layerwise")
    ap.add_argument("--checkpoint-note", default="the default pipeline, GPTQ 4-bit g128 + QEP")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40, help="perplexity windows of 512 tokens per text")
    ap.add_argument("--bf16-new-tokens", type=int, help="new tokens of the bf16 row (default --new-tokens): it "
                                                          "decodes about 18x slower than fp32 on CPUs without fast bf16")
    ap.add_argument("--note", default="", help="a sentence on the conditions of the run, recorded with the results")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.bf16_new_tokens = args.bf16_new_tokens or args.new_tokens
    if args.row:
        print(json.dumps(measure_row(args.row, args.checkpoint, args.threads, args.new_tokens, args.prefill)))
        return
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    load_start = os.getloadavg()[0]
    rows = {}
    for kind in ("float32", "checkpoint", "bfloat16"):
        rows[kind] = run_child(args, kind, args.bf16_new_tokens if kind == "bfloat16" else args.new_tokens)
        print(f"{kind}: {rows[kind]}", file=sys.stderr, flush=True)
    result = {"environment": {**environment(), "machine": f"{platform.machine()} {_cpu_name()}, "
                              f"{os.cpu_count()} logical CPUs"},
              "threads": args.threads, "checkpoint": args.checkpoint, "checkpoint_note": args.checkpoint_note,
              "note": args.note,
              "rows": rows, "perplexity": perplexities(args.checkpoint, args.windows, args.threads),
              "microbenchmark": microbenchmark(args.threads), "cuda": cuda_section(args.checkpoint, args.new_tokens)}
    result["loadavg"] = [load_start, os.getloadavg()[0]]  # 1-minute load average at the start and the end
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "inference.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    (RESULTS / "inference.md").write_text(markdown(result))
    print(markdown(result))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
