"""Rewrite the generated results sections of README.md and of the MDBF README from benchmarks/results/*.json
(no hand-typed figures)."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, TEXTS, flips, fmt  # noqa: E402

README = Path(__file__).parent.parent / "README.md"
#: bit budgets of the headline table: a row belongs to budget b when b <= bits per weight < b + SPAN
BUDGETS = (4, 3, 2)
SPAN = 0.5


def _load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _final(key: str, row: dict) -> dict:
    """A quality.json row as ``{name, bpw, ppl}``, taken at its last stage."""
    last = (row.get("stages") or [row])[-1]
    return {"name": key, "bpw": last["bits_per_weight"], "ppl": last["ppl"]}


def candidates() -> tuple[list[dict], list[dict], list[dict]]:
    """(RTN rows, our other rows, peer rows), each ``{tool, name, bpw, ppl}``, from the recorded JSON."""
    rtn, ours, peers = [], [], []
    for key, row in _load("quality").items():
        (rtn if key.startswith("rtn-") else ours).append({"tool": _tool("ours"), **_final(key, row)})
    for row in _load("compare").values():
        if not isinstance(row, dict) or not row.get("ppl") or not (row.get("bits") or {}).get("bits_per_weight"):
            continue  # fp32 rows and the _unavailable list
        entry = {"tool": _tool(row["tool"]), "name": row["setting"],
                 "bpw": row["bits"]["bits_per_weight"], "ppl": row["ppl"]}
        if row["tool"] != "ours":
            peers.append(entry)
        elif not row.get("source"):  # rows copied from quality.json are already in
            (rtn if row["setting"].startswith("rtn-") else ours).append(entry)
    return rtn, ours, peers


def score(row: dict) -> float:
    """Geometric mean of the perplexities on the protocol's two texts (lower is better)."""
    return math.exp(sum(math.log(row["ppl"][t]) for t in TEXTS) / len(TEXTS))


def best(rows: list[dict], bits: int, cap: float | None = None) -> dict | None:
    """The lowest-scoring row in the budget's band, at no more than ``cap`` bits per weight if given."""
    inside = [r for r in rows if bits <= r["bpw"] < bits + SPAN and (cap is None or r["bpw"] <= cap)]
    return min(inside, key=lambda r: (score(r), r["tool"], r["name"])) if inside else None


def headline() -> list[str]:
    """The README's results table: fp32, then per bit budget RTN, our best row and the strongest peer's."""
    fp = _load("fp32")
    rtn, ours, peers = candidates()
    lines = ["| bits | tool | setting | bits/weight | ppl KJV gospels | ppl pydoc (out of domain) |",
             "|---|---|---|---|---|---|"]
    if fp:
        lines.append(f"| fp32 | – | SmolLM2-135M as shipped | 32 | {fmt(fp['ppl'][TEXTS[0]])} | "
                     f"{fmt(fp['ppl'][TEXTS[1]])} |")
    missing = []
    for bits in BUDGETS:
        peer = best(peers, bits)
        for label, rows in (("RTN", rtn), ("OneComp", ours), ("peer tool", peers)):
            # ours at no more bits than the strongest peer where such a row exists: a fair comparison
            r = (best(rows, bits, peer["bpw"]) if rows is ours and peer else None) or best(rows, bits)
            if r is None:
                missing.append(f"{label} at {bits} bits")
                continue
            name = f"**{r['name']}**" if rows is ours else r["name"]
            lines.append(f"| {bits} | {r['tool']} | {name} | {fmt(r['bpw'], 3)} | {fmt(r['ppl'][TEXTS[0]])} | "
                         f"{fmt(r['ppl'][TEXTS[1]])} |")
    if missing:
        lines += ["", "Nothing recorded yet for: " + ", ".join(missing) + "."]
    return lines


def section() -> str:
    lines = ["SmolLM2-135M on the [benchmark protocol](docs/protocol.md): calibrated on 128 × 512 KJV tokens, "
             "perplexity on 40 × 512-token windows of the KJV gospels (in domain) and of CPython's pydoc topics "
             "(out of domain), bits per weight counted from the stored bytes. For each budget of b bits "
             f"(b ≤ bits/weight < b + {SPAN}): round to nearest, the strongest peer tool and our best recorded "
             "pipeline at no more bits per weight than that peer, best meaning the lowest geometric mean of the "
             "two perplexities.", "", *headline(), ""]
    speed = _speed_line()
    if speed:
        lines += [f"Speed and memory, measured back to back: {speed}", ""]
    inference = _inference_line()
    if inference:
        lines += [inference, ""]
    lines.append("Every row and setting: [quality.md](benchmarks/results/quality.md) (our pipelines), "
                 "[compare.md](benchmarks/results/compare.md) (peer tools and the ratios ours / peer), "
                 "[scaling.md](benchmarks/results/scaling.md) (time and memory against size), "
                 "[history.md](benchmarks/results/history.md) (the default run by date). "
                 "Generated from `benchmarks/results/*.json` by `python benchmarks/readme_results.py`.")
    return "\n".join(lines)


def _speed_line() -> str | None:
    """Time and peak memory of the comparison's speed-target pair (compare_report.SPEED_TARGET), as ratios."""
    try:
        from compare_report import SPEED_TARGET
    except ImportError:
        return None
    mine, peer = SPEED_TARGET[:2]
    data = _load("compare")
    a, b = data.get(mine), data.get(peer)
    if not all(r and r.get("quant_seconds") and r.get("peak_rss_mb") for r in (a, b)):
        return None
    return (f"our `{a['setting']}` took {a['quant_seconds'] / b['quant_seconds']:.2f}× the quantization time "
            f"and {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}× the peak memory of {_tool(b['tool'])}'s "
            f"`{b['setting']}` ({fmt(a['quant_seconds'], 0)} / {fmt(b['quant_seconds'], 0)} s, "
            f"{fmt(a['peak_rss_mb'], 0)} / {fmt(b['peak_rss_mb'], 0)} MiB, {a['threads']} threads).")


def _inference_line() -> str | None:
    """Memory and decode speed of a 4-bit checkpoint run by ``onecomp.load`` against the dense model."""
    r = _load("inference")
    rows = r.get("rows", {})
    q, fp32, bf16 = rows.get("checkpoint"), rows.get("float32"), rows.get("bfloat16")
    if not (q and fp32 and bf16):
        return None
    what = r.get("checkpoint_note", "").split(":")[0] or "a 4-bit one"
    return (f"Running compressed ([inference.md](benchmarks/results/inference.md)): the checkpoint of {what}, loaded by "
            f"`onecomp.load` adds {q['rss_added_mib'] / fp32['rss_added_mib']:.2f}× the fp32 model's resident memory "
            f"({fmt(q['rss_added_mib'], 0)} / {fmt(fp32['rss_added_mib'], 0)} MiB) and decodes "
            f"{q['decode_tokens_per_s'] / fp32['decode_tokens_per_s']:.2f}× as many tokens/s as fp32 and "
            f"{q['decode_tokens_per_s'] / bf16['decode_tokens_per_s']:.2f}× as many as bf16 "
            f"({r['threads']} thread{'s' if r['threads'] != 1 else ''}, one run; conditions in the linked page).")


#: how peer tools are named in the README (compare.json's tool keys otherwise)
TOOL_NAMES = {"ours": "OneComp", "onecomp-orig": "OneComp 1.4 (original release)", "llmcompressor": "llm-compressor",
              "gptqmodel": "GPTQModel", "hqq": "HQQ"}


def _tool(key: str) -> str:
    return TOOL_NAMES.get(key, key)


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
