"""Where the layer-wise stage spends its time: cProfile over a run on the first blocks of the embedded model.

    python benchmarks/profile_layerwise.py                       # GPTQ 4-bit g128, 8 blocks
    python benchmarks/profile_layerwise.py --qep --bits 3        # GPTQ + QEP
    python benchmarks/profile_layerwise.py --sequential block --blocks 4 --top 25

The model keeps only its first ``--blocks`` decoder layers (the per-block cost is what matters; memory
does not grow with depth, see results/scaling.md); calibration is the protocol's 128 × 512 KJV tokens
and evaluation 8 windows of the KJV gospels. Prints the share of the run's wall time spent in each part
(cumulative time of the functions that implement it) and cProfile's top entries. The parts are matched
by function name, so they can overlap a little (``finish`` also counts StatsCollector.finish, and the
stages it runs for groups nobody asked for).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import pstats
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import PROTOCOL  # noqa: E402

#: part of the stage -> (file suffix, function name) whose cumulative time measures it
PARTS = {
    "capture: layer by layer (forward passes of both paths)": ("calibration/capture.py", "_advance"),
    "capture: block by block (statistics pass)": ("calibration/capture.py", "capture_block"),
    "propagation to the next block": ("calibration/capture.py", "propagate_"),
    "block outputs (SequentialCapture.finish)": ("calibration/capture.py", "finish"),
    "Hessian and cross accumulation": ("calibration/capture.py", "add"),
    "QEP correction": ("onecomp_qep/qep.py", "adjust"),
    "quantizer (GPTQ solve, packing)": ("onecomp_gptq/quantizers.py", "quantize"),
    "checkpoint of each block": ("checkpoint/blocks.py", "save"),
    "evaluation (ppl)": ("evaluation/perplexity.py", "perplexity"),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--qep", action="store_true")
    p.add_argument("--sequential", choices=["layer", "block"], default="layer")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()

    import onecomp

    run_module = importlib.import_module("onecomp.pipeline.run")  # the module; onecomp.pipeline.run is the function
    real_load = run_module.load_model

    def first_blocks(*a, **kw):
        loaded = real_load(*a, **kw)
        loaded.model.model.layers = loaded.model.model.layers[: args.blocks]
        loaded.model.config.num_hidden_layers = args.blocks
        return loaded

    run_module.load_model = first_blocks
    with tempfile.TemporaryDirectory(prefix="onecomp-profile-") as tmp:
        calibration = {**PROTOCOL["calibration"], "sequential": args.sequential}
        config = {"model": {"id": "smollm2-135m"}, "calibration": calibration,
                  "plan": {"quantizer": {"name": "gptq", "bits": args.bits, "group_size": args.group_size}},
                  "refiners": [{"name": "qep"}] if args.qep else [],
                  "evaluation": {"texts": ["kjv-gospels"], "windows": 8, "before": False},
                  "output": {"dir": str(Path(tmp) / "run")}}
        profiler = cProfile.Profile()
        profiler.enable()
        onecomp.run(config, progress=False)
        profiler.disable()
    stats = pstats.Stats(profiler)
    total = max(v[3] for v in stats.stats.values())  # the outermost call's cumulative time
    print(f"{args.blocks} blocks, GPTQ {args.bits}-bit g{args.group_size}{' + QEP' if args.qep else ''}, "
          f"sequential = {args.sequential}: {total:.1f} s in all")
    for part, (suffix, name) in PARTS.items():
        seconds = sum(v[3] for (file, _, fn), v in stats.stats.items() if fn == name and file.endswith(suffix))
        if seconds:
            print(f"  {100 * seconds / total:5.1f}%  {seconds:7.1f} s  {part}")
    print()
    stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
