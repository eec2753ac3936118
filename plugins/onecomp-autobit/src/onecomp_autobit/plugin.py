"""Entry point of onecomp-autobit: the ``autobit`` planner, and its allocation in the layer-wise
stage report (a blocks × module kinds table, and a PNG heatmap beside it)."""

from __future__ import annotations

from pathlib import Path

from onecomp import hookimpl

from . import allocation
from .planner import AutoBit


@hookimpl
def register_planners(register):
    register(AutoBit)


def _planner_name(config: dict) -> str | None:
    planner = (config.get("plan") or {}).get("planner", "uniform")
    return planner.get("name") if isinstance(planner, dict) else planner


@hookimpl
def on_stage_end(run, stage, report):
    """After the layer-wise stage of an autobit run: add the allocation, from the stored bits of each
    layer, to the stage's markdown report and draw it next to it."""
    if stage.name != "layerwise" or run.out_dir is None or _planner_name(run.config) != "autobit":
        return
    layer_bpw = {r["name"]: r["bits_per_weight"] for r in report.details.get("layers", [])}
    if not layer_bpw:
        return
    reports = Path(run.out_dir) / "reports"
    stem = f"{stage.index:02d}-{stage.name}"
    image = allocation.png(layer_bpw, reports / f"{stem}-allocation.png",
                           f"AutoBit: {report.bits.get('bits_per_weight', 0):.4f} stored bits per weight")
    md = reports / f"{stem}.md"
    section = ["", "## Bit allocation (autobit)", "",
               "Stored bits per weight of each layer, by block and module kind"
               + (f" ([heatmap]({image.name}))." if image else " (install matplotlib for the heatmap)."), "",
               allocation.markdown(layer_bpw)]
    with md.open("a") as f:
        f.write("\n".join(section))
