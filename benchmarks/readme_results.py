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
SHOWN = ["rtn-w4g128", "gptq-w4g128-shrink0", "gptq-w4g128-damp1", "gptq-w4g128-shrink0.5", "gptq-w4g128-minmax",
         "gptq+qep-w4g128-minmax", "rtn-w3g128", "gptq-w3g128-minmax", "gptq+qep-w3g128-minmax",
         "rtn-w3pc", "gptq-w3pc", "gptq+qep-w3pc", "rtn-w2g64", "gptq-w2g64", "gptq+qep-w2g64",
         "gptq-w3g128+blockwise+global", "dbf-1.0", "dbf-1.5", "dbf-2.0", "mdbf-l2-1.0", "mdbf-l2-1.5",
         "mdbf-l2-2.0", "mdbf-1.0", "mdbf-1.5", "mdbf-2.0", "dbf-1.0+blockwise+signlock",
         "dbf-1.5+blockwise+signlock", "dbf-2.0+blockwise+signlock", "mdbf-1.0+blockwise+signlock",
         "mdbf-1.5+blockwise", "mdbf-1.5+blockwise+signlock", "mdbf-2.0+blockwise", "mdbf-2.0+blockwise+signlock",
         "mdbf-2.0+blockwise-envelopes"]


def section() -> str:
    quality = json.loads((RESULTS / "quality.json").read_text()) if (RESULTS / "quality.json").exists() else {}
    fp = json.loads((RESULTS / "fp32.json").read_text()) if (RESULTS / "fp32.json").exists() else None
    lines = ["SmolLM2-135M on the benchmark protocol (BENCHMARK.md): calibration 128 × 512 KJV tokens; ppl on the "
             "KJV gospels (in domain) and CPython's pydoc topics (out of domain); bits per weight from the stored "
             "bytes; time is the layer-wise stage on 2 CPU cores. Full table: "
             "[benchmarks/results/quality.md](benchmarks/results/quality.md). GPTQ's default is `shrink = 0.5` "
             "(rows `gptq-w4g128-shrink0.5`, `gptq-w3g128-minmax`, `gptq+qep-*`); `shrink0` and `damp1` are GPTQ as "
             "commonly configured, which loses to RTN out of domain (see plugins/onecomp-gptq/README.md). The GPTQ "
             "rows here use the min-max grid (`mse = false`); GPTQ's default since is the MSE grid, whose rows "
             "are in the comparison below.", "",
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
    import compare_report as compare

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
    speed = compare.speed_line(data)
    lines += ["", speed, ""] if speed else [""]
    return lines


MDBF_README = Path(__file__).parent.parent / "plugins" / "onecomp-mdbf" / "README.md"
#: the binary rows of the MDBF README: (label, layer-wise row, its block-wise + signlock row)
BINARY = [(f"{label} {b}", f"{key}-{b}", f"{key}-{b}+blockwise+signlock")
          for key, label in (("dbf", "DBF (l = 1, P = 1)"), ("mdbf", "MDBF defaults (l = 1, P = 2)"),
                             ("mdbf-l2", "MDBF l = 2, P = 1"))
          for b in ("1.0", "1.5", "2.0")]


def binary_section() -> str:
    """DBF and MDBF at 1.0 / 1.5 / 2.0 bits: the layer-wise row and, where run, block-wise + signlock after it."""
    quality = json.loads((RESULTS / "quality.json").read_text()) if (RESULTS / "quality.json").exists() else {}
    lines = ["| format, target bpw | bits/weight | layer-wise ppl gospels / pydoc | time (s) | peak RSS (MiB) | "
             "+ blockwise + signlock ppl gospels / pydoc | blockwise time (s) | sign flips |",
             "|---|---|---|---|---|---|---|---|"]
    for label, key, refined in BINARY:
        stages = quality.get(refined, {}).get("stages", [])
        if len(stages) > 1:  # the block-wise run's own first stage: the checkpoint its second stage refined
            r = {"bits_per_weight": stages[0]["bits_per_weight"], "ppl": stages[0]["ppl"],
                 "quant_seconds": stages[0]["seconds"], "peak_rss_mb": stages[0]["peak_rss_mb"]}
        elif key in quality:
            r = quality[key]
        else:
            lines.append(f"| {label} | not run | | | | | | |")
            continue
        row = (f"| {label} | {fmt(r['bits_per_weight'], 3)} | {fmt(r['ppl'][TEXTS[0]])} / {fmt(r['ppl'][TEXTS[1]])} | "
               f"{fmt(r['quant_seconds'], 0)} | {fmt(r['peak_rss_mb'], 0)} |")
        if len(stages) > 1:
            st = stages[1]
            rate = flips(st).removeprefix(", sign flips ") or "–"
            row += f" {fmt(st['ppl'][TEXTS[0]])} / {fmt(st['ppl'][TEXTS[1]])} | {fmt(st['seconds'], 0)} | {rate} |"
        else:
            row += " – | – | – |"
        lines.append(row)
    lines += ["", "Where a block-wise row exists, the layer-wise columns are its own first stage (the checkpoint the "
              "block-wise stage refined), which can differ from the standalone layer-wise row in quality.md (an "
              "earlier session, calibrated block by block; at these bits ppl is very sensitive). Generated from "
              "`benchmarks/results/quality.json` by `python benchmarks/readme_results.py`; notes per row (load on the 2 cores, how the time splits) are in "
              "[quality.md](../../benchmarks/results/quality.md)."]
    return "\n".join(lines)


def _rewrite(path: Path, body: str) -> None:
    text = path.read_text()
    if "<!-- results:start -->" not in text:
        raise SystemExit(f"{path}: no <!-- results:start --> … <!-- results:end --> markers")
    path.write_text(re.sub(r"<!-- results:start -->.*<!-- results:end -->",
                           lambda _: f"<!-- results:start -->\n{body}\n<!-- results:end -->", text, flags=re.S))


def main():
    _rewrite(README, section())
    _rewrite(MDBF_README, binary_section())
    print(section())
    print(binary_section())


if __name__ == "__main__":
    main()
