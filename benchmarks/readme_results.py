"""Rewrite README.md's results section from benchmarks/results/*.json (no hand-typed figures)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, TEXTS, flips, fmt  # noqa: E402

README = Path(__file__).parent.parent / "README.md"
#: rows shown in the README, in order (everything else stays in results/quality.md)
SHOWN = ["rtn-w4g128", "gptq-w4g128-shrink0", "gptq-w4g128-damp1", "gptq-w4g128-shrink0.5", "gptq-w4g128",
         "gptq+qep-w4g128", "rtn-w3g128", "gptq-w3g128", "gptq+qep-w3g128",
         "rtn-w3pc", "gptq-w3pc", "gptq+qep-w3pc", "rtn-w2g64", "gptq-w2g64", "gptq+qep-w2g64",
         "gptq-w3g128+blockwise+global", "dbf-1.0", "dbf-1.5", "dbf-2.0", "mdbf-l2-1.0", "mdbf-l2-1.5",
         "mdbf-1.5", "mdbf-2.0", "mdbf-1.5+blockwise", "mdbf-1.5+blockwise+signlock", "mdbf-2.0+blockwise",
         "mdbf-2.0+blockwise+signlock", "mdbf-2.0+blockwise-envelopes"]


def section() -> str:
    quality = json.loads((RESULTS / "quality.json").read_text()) if (RESULTS / "quality.json").exists() else {}
    fp = json.loads((RESULTS / "fp32.json").read_text()) if (RESULTS / "fp32.json").exists() else None
    lines = ["SmolLM2-135M on the benchmark protocol (BENCHMARK.md): calibration 128 × 512 KJV tokens; ppl on the "
             "KJV gospels (in domain) and CPython's pydoc topics (out of domain); bits per weight from the stored "
             "bytes; time is the layer-wise stage on 2 CPU cores. Full table: "
             "[benchmarks/results/quality.md](benchmarks/results/quality.md). GPTQ's default is `shrink = 0.5` "
             "(rows `gptq-w4g128-shrink0.5`, `gptq-w3g128`, `gptq+qep-*`); `shrink0` and `damp1` are GPTQ as "
             "commonly configured, which loses to RTN out of domain (see plugins/onecomp-gptq/README.md).", "",
             "| setting | bits/weight | ppl gospels | ppl pydoc | stage time (s) |", "|---|---|---|---|---|"]
    if fp:
        lines.append(f"| fp32 | 32 | {fmt(fp['ppl'][TEXTS[0]])} | {fmt(fp['ppl'][TEXTS[1]])} | – |")
    for key in SHOWN:
        if key in quality:
            r = quality[key]
            stages = r.get("stages") or [{"name": "layerwise", "ppl": r["ppl"], "bits_per_weight": r["bits_per_weight"],
                                          "seconds": r["quant_seconds"]}]
            for i, st in enumerate(stages):
                label = key if len(stages) == 1 else f"{key}: stage {i + 1} {st['name']}{flips(st)}"
                lines.append(f"| {label} | {fmt(st['bits_per_weight'], 3)} | {fmt(st['ppl'][TEXTS[0]])} | "
                             f"{fmt(st['ppl'][TEXTS[1]])} | {fmt(st['seconds'], 0)} |")
    lines.append("")
    lines.append("Times were measured while other jobs shared the 2 cores; notes per row are in quality.md.")
    lines += ["", *peer_section()]
    lines.append("Generated from `benchmarks/results/` by `python benchmarks/readme_results.py`.")
    return "\n".join(lines)


def peer_section() -> list[str]:
    """Ours / peer ratios from results/compare.json (compare.py's own ratio rule), one line per pair."""
    import compare

    data = compare.load_results()
    data.pop("_unavailable", None)
    pairs = compare.ratios(data)
    if not pairs:
        return []
    lines = ["Against other tools on the same inputs, threads and evaluation "
             "([benchmarks/results/compare.md](benchmarks/results/compare.md), `benchmarks/compare.py`): ratios "
             "ours / peer, below 1 is better for us; ¹ marks our rows reused from quality.json (their time and "
             "memory come from another session).", "",
             "| ours | peer | bits/weight ours / peer | ppl gospels | ppl pydoc | quant time | peak RSS |",
             "|---|---|---|---|---|---|---|"]
    for r in pairs:
        a, b = r["bpw"]
        lines.append(f"| {r['ours']} | {r['peer']} | {a:.3f} / {b:.3f} | {r['ppl'][TEXTS[0]]:.3f} | "
                     f"{r['ppl'][TEXTS[1]]:.3f} | {fmt(r['time'])} | {fmt(r['memory'])} |")
    lines.append("")
    return lines


def main():
    text = README.read_text()
    new = re.sub(r"<!-- results:start -->.*<!-- results:end -->",
                 lambda _: f"<!-- results:start -->\n{section()}\n<!-- results:end -->", text, flags=re.S)
    README.write_text(new)
    print(section())


if __name__ == "__main__":
    main()
