"""Shared helpers for benchmark scripts: protocol settings, result files, markdown tables."""

from __future__ import annotations

import json
import platform
import time
from importlib.metadata import version
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
TEXTS = ["kjv-gospels", "pydoc-topics"]
PROTOCOL = {"calibration": {"corpus": "kjv", "samples": 128, "seq_len": 512, "seed": 0},
            "evaluation": {"texts": TEXTS, "windows": 40, "seq_len": 512, "before": False}}


def environment() -> dict:
    return {"torch": torch.__version__, "transformers": version("transformers"), "onecomp": version("onecomp"),
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d")}


def record(name: str, key: str, row: dict) -> dict:
    """Merge ``row`` under ``key`` into ``results/<name>.json`` (one file per benchmark)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = row
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    return data


def fmt(x, digits=2):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) >= 1e4 else f"{x:.{digits}f}"
    return str(x)


def flips(stage: dict) -> str:
    """', sign flips x%' for a stage whose signlock regularizer reported a flip rate."""
    report = (stage.get("regularizers") or {}).get("signlock")
    return f", sign flips {100 * report['flip_rate']:.2f}%" if report and "flip_rate" in report else ""

