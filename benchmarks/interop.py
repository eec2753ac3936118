"""Exports of a real checkpoint read back by other loaders: perplexity of the embedded SmolLM2-135M
after RTN 4-bit g64 (sym and asym; g128 does not divide its 576 columns, which compressed-tensors needs), through onecomp.load, through transformers' GGUF reader on
``onecomp export --to gguf``, and through plain transformers on ``--to compressed-tensors``.

    OMP_NUM_THREADS=2 flock /tmp/onecomp-heavy.lock python benchmarks/interop.py

Writes benchmarks/results/interop.json and .md.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import onecomp
from onecomp import Registry
from onecomp.checkpoint import save_checkpoint
from onecomp.evaluation import eval_windows, perplexity
from onecomp.export import export
from onecomp.models import load_model

OUT = Path(__file__).parent / "results"
TEXT, WINDOWS, SEQ_LEN = "kjv-gospels", 16, 512


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m", help="a model with the embedded model's tokenizer")
    p.add_argument("--windows", type=int, default=WINDOWS)
    p.add_argument("--out", default=str(OUT), help="directory for interop.json and interop.md")
    args = p.parse_args(argv)
    out_dir = Path(args.out)
    torch.set_num_threads(2)
    reg = Registry.default()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for sym in (True, False):
            loaded = load_model(args.model)
            windows = eval_windows(loaded.tokenizer, TEXT, args.windows, SEQ_LEN)
            calib = windows[:2]
            onecomp.compress(loaded.model, config={"plan": {"quantizer": {"name": "rtn", "bits": 4, "group_size": 64,
                                                                          "sym": sym}}}, windows=calib, registry=reg)
            ckpt = tmp / f"ckpt-{sym}"
            save_checkpoint(loaded.model, loaded.tokenizer, ckpt, reg, base_model="smollm2-135m", config={}, stages=[])
            row = {"setting": f"rtn w4 g64 {'sym' if sym else 'asym'}", "model": args.model, "text": TEXT,
                   "windows": args.windows,
                   "seq_len": SEQ_LEN}
            t = time.perf_counter()
            row["onecomp.load"] = perplexity(onecomp.load(ckpt, backend=None), windows)
            gguf = export(ckpt, "gguf", tmp / f"gguf-{sym}" / "model.gguf")
            from transformers import AutoModelForCausalLM

            m = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            row["transformers on --to gguf"] = perplexity(m.eval(), windows)
            row["gguf_mib"] = round(gguf.stat().st_size / 2**20, 2)
            ct = export(ckpt, "compressed-tensors", tmp / f"ct-{sym}")
            try:
                m = AutoModelForCausalLM.from_pretrained(str(ct))
                row["transformers on --to compressed-tensors"] = perplexity(m.eval(), windows)
            except Exception as exc:  # transformers 5.x refuses asymmetric pack-quantized files
                row["transformers on --to compressed-tensors"] = f"refused: {type(exc).__name__}"
            row["onecomp.load on --to compressed-tensors"] = perplexity(onecomp.load(ct), windows)
            row["seconds"] = round(time.perf_counter() - t, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out_dir / "interop.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2) + "\n")
    keys = [k for k in rows[0] if k not in ("setting", "model", "text", "windows", "seq_len", "seconds", "gguf_mib")]
    lines = [f"# Interop: {args.model} through other loaders ({TEXT}, {args.windows}×{SEQ_LEN} tokens)", "",
             "Made by `benchmarks/interop.py`. Perplexity; the relative gap to onecomp.load in brackets.", "",
             "| setting | " + " | ".join(keys) + " | GGUF MiB |", "|---" * (len(keys) + 2) + "|"]
    for r in rows:
        base = r["onecomp.load"]
        cells = [f"{r[k]:.4f} ({100 * (r[k] / base - 1):+.2f}%)" if isinstance(r[k], float) else str(r[k])
                 for k in keys]
        lines.append(f"| {r['setting']} | " + " | ".join(cells) + f" | {r['gguf_mib']} |")
    (out_dir / "interop.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
