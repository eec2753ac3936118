"""One-invocation comparison with peer tools on the benchmark protocol (docs/protocol.md).

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
import os
import subprocess
import sys
from pathlib import Path

# this file is the command line only; the parts: compare_catalogue.py (tools, settings, notes),
# compare_harness.py (venvs, inputs, runs, recording), compare_report.py (compare.md, ratios, plot)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt  # noqa: E402
from compare_catalogue import OURS, TOOLS, settings_for  # noqa: E402
from compare_harness import FULL, JSON, load_results, measure, model_dir, setup, write_inputs  # noqa: E402
from compare_report import bpw, print_ratios, regenerate  # noqa: E402


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

    jobs = [(tool, name, params) for tool in tools for name, params in settings_for(tool, wanted, args.fp).items()]
    for tool, name, params in jobs:
        row = measure(tool, name, params, inputs=inputs, work=args.work, threads=args.threads, out_json=out_json,
                      from_quality=args.ours_from_quality, samples=args.samples, windows=args.windows)
        if row is None:
            continue
        ppl = ", ".join(f"{t} {v:.2f}" for t, v in (row.get("ppl") or {}).items())
        print(f"{tool}/{name}: bpw {fmt(bpw(row), 3)}; ppl {ppl}; quant {fmt(row.get('quant_seconds'), 0)} s; "
              f"peak RSS {fmt(row.get('peak_rss_mb'), 0)} MiB; load {row.get('loadavg_start', ['–'])[0]}"
              + "".join(f"\n  WARNING: {w}" for w in row["warnings"]), flush=True)
    text = regenerate(out_json)
    if out_json == JSON:
        print(text)
    print_ratios(load_results(out_json))


if __name__ == "__main__":
    main()
