"""Why GPTQ loses to RTN out of domain on a narrow calibration corpus: which layers, which settings.

Quantizes one layer type at a time (the rest stays fp) with RTN and with GPTQ, on a
reduced protocol (64 × 512 calibration tokens, 16 evaluation windows per text), and
records the perplexity change each causes on both texts to results/ood_study.json.

    python benchmarks/ood_study.py                 # all layer types, 4-bit g128
    python benchmarks/ood_study.py --bits 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import TEXTS, environment, record  # noqa: E402

TYPES = {
    "attn-qkv": ["re:self_attn\\.(q|k|v)_proj$"],
    "attn-o": ["re:self_attn\\.o_proj$"],
    "mlp-gate-up": ["re:mlp\\.(gate|up)_proj$"],
    "mlp-down": ["re:mlp\\.down_proj$"],
}
ALL = [p for v in TYPES.values() for p in v]


def run(quantizer: dict, keep: list, samples: int, windows: int, before: bool) -> dict:
    import onecomp

    ignore = [p for p in ALL if p not in keep]
    with tempfile.TemporaryDirectory(prefix="onecomp-ood-") as tmp:
        result = onecomp.run({
            "model": {"id": "smollm2-135m"},
            "calibration": {"corpus": "kjv", "samples": samples, "seq_len": 512},
            "plan": {"planner": "uniform", "ignore": ignore, "quantizer": quantizer},
            "evaluation": {"texts": TEXTS, "windows": windows, "seq_len": 512, "before": before},
            "output": {"dir": tmp}}, progress=False)
    return {"before": result["before"], "after": result["stages"][0]["ppl"],
            "bits_per_weight": result["stages"][0]["bits"]["bits_per_weight"]}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--types", nargs="*", default=list(TYPES))
    p.add_argument("--gptq", default="{}", help="extra GPTQ params as JSON, e.g. '{\"damp\": 0.1}'")
    args = p.parse_args()
    import json

    extra = json.loads(args.gptq)
    tag = "-".join(f"{k}{v}" for k, v in sorted(extra.items()))
    first = True
    for t in args.types:
        for name in ("rtn", "gptq"):
            q = {"name": name, "bits": args.bits, "group_size": 128, **(extra if name == "gptq" else {})}
            row = run(q, TYPES[t], args.samples, args.windows, before=first)
            first = False
            key = f"w{args.bits}-{t}-{name}{('-' + tag) if tag and name == 'gptq' else ''}"
            row.update(quantizer=q, samples=args.samples, windows=args.windows, env=environment())
            record("ood_study", key, row)
            print(key, {k: round(v, 3) for k, v in row["after"].items()}, flush=True)


if __name__ == "__main__":
    main()
