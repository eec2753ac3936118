"""The bit allocation as blocks × module kinds: a markdown table and a PNG heatmap."""

from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

_BLOCK = re.compile(r"^(.*?)\.(\d+)\.(.+)$")  # "<blocks path>.<index>.<module>"


def grid(layer_bpw: dict) -> tuple[list[int], list[str], dict]:
    """Blocks, module kinds (in first-seen order) and ``{(block, kind): bits per weight}``."""
    blocks, kinds, cells = [], [], {}
    for name, bpw in layer_bpw.items():
        m = _BLOCK.match(name)
        if m is None:
            continue
        b, kind = int(m.group(2)), m.group(3)
        if b not in blocks:
            blocks.append(b)
        if kind not in kinds:
            kinds.append(kind)
        cells[(b, kind)] = bpw
    return sorted(blocks), kinds, cells


def markdown(layer_bpw: dict) -> str:
    """A table with one row per block and one column per module kind, bits per weight in each cell."""
    blocks, kinds, cells = grid(layer_bpw)
    short = [k.rsplit(".", 1)[-1] for k in kinds]
    lines = ["| block | " + " | ".join(short) + " |", "|---|" + "---|" * len(kinds)]
    for b in blocks:
        lines.append(f"| {b} | " + " | ".join(f"{cells[(b, k)]:.2f}" if (b, k) in cells else "–" for k in kinds) + " |")
    return "\n".join(lines) + "\n"


def png(layer_bpw: dict, path: Path, title: str = "") -> Path | None:
    """A heatmap (blocks × module kinds, bits per weight annotated) at ``path``; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("autobit: matplotlib is not installed, so no allocation PNG; pip install matplotlib")
        return None
    import numpy as np

    blocks, kinds, cells = grid(layer_bpw)
    data = np.array([[cells.get((b, k), np.nan) for k in kinds] for b in blocks])
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(kinds), 2.0 + 0.28 * len(blocks)))
    im = ax.imshow(data, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(kinds)), [k.rsplit(".", 1)[-1] for k in kinds], rotation=30, ha="right")
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_ylabel("block")
    mid = np.nanmean([np.nanmin(data), np.nanmax(data)])
    for i in range(len(blocks)):
        for j in range(len(kinds)):
            if np.isfinite(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if data[i, j] > mid else "white")
    fig.colorbar(im, ax=ax, label="stored bits per weight")
    ax.set_title(title or "AutoBit allocation", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
