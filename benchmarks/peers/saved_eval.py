"""Perplexity of a checkpoint a peer saved, read by ``onecomp.load`` (OneComp's importer of
compressed-tensors pack-quantized and classic GPTQ directories), on the shared evaluation windows.

Runs in the interpreter that has our onecomp (``peer_common.evaluate_saved`` starts it), never in a
peer's venv; prints one JSON line ``RESULT {...}`` with the ppl of each text.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO))
import torch  # noqa: E402
from peer_common import peak_rss_mb, perplexity  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", required=True, help="the directory the peer saved")
    p.add_argument("--inputs", required=True, help="safetensors file with eval/<text> windows")
    p.add_argument("--threads", type=int, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import onecomp
    from onecomp.checkpoint.io import foreign_reader
    from safetensors.torch import load_file

    if Path(onecomp.__file__).resolve().parent.parent != REPO:
        raise SystemExit(f"onecomp imported from {onecomp.__file__}, not from {REPO}")
    importer = foreign_reader(Path(args.checkpoint))
    if importer is None:
        raise SystemExit(f"{args.checkpoint}: neither a compressed-tensors pack-quantized nor a GPTQ directory")
    t0 = time.perf_counter()
    model = onecomp.load(args.checkpoint)
    load_seconds = time.perf_counter() - t0
    evals = {k.split("/", 1)[1]: v for k, v in load_file(args.inputs).items() if k.startswith("eval/")}
    t0 = time.perf_counter()
    ppl = {text: perplexity(model, w) for text, w in evals.items()}
    print("RESULT " + json.dumps({"ppl": ppl, "loader": "onecomp.load", "importer": importer.__name__,
                                  "load_seconds": load_seconds, "eval_seconds": time.perf_counter() - t0,
                                  "peak_rss_mb": peak_rss_mb(), "onecomp": str(REPO)}), flush=True)


if __name__ == "__main__":
    main()
