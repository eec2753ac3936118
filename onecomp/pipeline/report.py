"""Stage reports as JSON and markdown, and time and peak-memory tracking."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import psutil

from ..components import StageReport


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled every 50 ms)."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process(os.getpid())

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def write_json(path: Path, data) -> None:
    """Atomic JSON write."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _fmt(x, digits=2):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.3g}" if x >= 1e4 else f"{x:.{digits}f}"
    return str(x)


def stage_markdown(report: StageReport, before: dict) -> str:
    lines = [f"# Stage {report.index}: {report.name} ({report.scope})", "",
             f"- checkpoint: `{report.checkpoint}`",
             f"- bits per weight (quantized layers, from stored bytes): {_fmt(report.bits.get('bits_per_weight'), 4)}",
             f"- model size: {report.bits.get('model_bytes', 0) / 2**20:.1f} MiB",
             f"- wall time: {report.seconds:.1f} s, peak resident memory: {report.peak_rss_mb:.0f} MiB", "",
             "| text | ppl before | ppl after |", "|---|---|---|"]
    for text, ppl in report.ppl.items():
        lines.append(f"| {text} | {_fmt(before.get(text))} | {_fmt(ppl)} |")
    return "\n".join(lines) + "\n"


def run_markdown(model: str, before: dict, stages: list[dict], total_seconds: float) -> str:
    texts = list(before) or (list(stages[0]["ppl"]) if stages else [])
    head = "| stage | " + " | ".join(f"ppl {t}" for t in texts) + " | bits/weight | time (s) | peak RSS (MiB) |"
    lines = [f"# OneComp run: {model}", "", head, "|" + "---|" * (len(texts) + 4),
             "| fp (before) | " + " | ".join(_fmt(before.get(t)) for t in texts) + " | "
             f"{_fmt(stages[0]['bits'].get('dense_bits_per_weight') if stages else None)} | – | – |"]
    for s in stages:
        lines.append(f"| {s['index']:02d}-{s['name']} | " + " | ".join(_fmt(s['ppl'].get(t)) for t in texts) +
                     f" | {_fmt(s['bits'].get('bits_per_weight'), 4)} | {s['seconds']:.1f} | {s['peak_rss_mb']:.0f} |")
    lines += ["", f"Total wall time: {total_seconds:.1f} s."]
    return "\n".join(lines) + "\n"
