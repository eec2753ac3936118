"""What benchmarks/compare.py compares: the peer tools, how each is installed, their settings and our own.

Facts only (no running, no tables): the harness (compare_harness.py) installs and runs what is named here,
the report (compare_report.py) prints the notes and groups rows by method family.
"""

from __future__ import annotations

from pathlib import Path

#: one virtual environment per peer tool, benchmarks/.venvs/<tool> (ignored by git)
VENVS = Path(__file__).resolve().parent / ".venvs"
#: pinned in every peer venv (the local CPU wheel), so no pip step can pull another build
TORCH = "torch==2.13.0"

#: tool -> how to install it (pip requirements, extra pip args, environment) and its settings
TOOLS = {
    "llmcompressor": {
        "pip": ["llmcompressor"], "dists": ["llmcompressor", "compressed-tensors", "transformers"],
        "settings": {
            # group 128 does not run on the 576-wide layers (see docs/benchmarks.md); 576 = 9 × 64
            "w4a16-g64": {"bits": 4, "group_size": 64},
            "w3a16-g64": {"bits": 3, "group_size": 64},
            "w4a16-g128": {"bits": 4, "group_size": 128, "bypass": True},
            "w4a16-g128-nobypass": {"bits": 4, "group_size": 128, "bypass": False},
        }},
    "onecomp-orig": {
        # the original authors' release; it declares Python >= 3.12 but installs and runs on 3.11
        # (pip would then also consider dependencies' releases for 3.12 only, e.g. a scipy sdist that refuses
        # to build, so the package goes in alone and its declared dependencies follow under normal rules)
        "pip": ["onecomp"], "pip_args": ["--ignore-requires-python", "--no-deps"], "then_deps_of": "onecomp",
        "dists": ["onecomp", "transformers"],
        "settings": {
            "gptq-w4g128": {"method": "gptq", "bits": 4, "group_size": 128},
            "gptq-w3g128": {"method": "gptq", "bits": 3, "group_size": 128},
            "gptq-w4g128-actorder-asym": {"method": "gptq", "bits": 4, "group_size": 128, "act_order": True,
                                          "sym": False},
            "gptq-w3g128-actorder-asym": {"method": "gptq", "bits": 3, "group_size": 128, "act_order": True,
                                          "sym": False},
            "gptq+qep-w4g128": {"method": "gptq", "bits": 4, "group_size": 128, "qep": True},
            "gptq+qep-w3g128": {"method": "gptq", "bits": 3, "group_size": 128, "qep": True},
        }},
    "auto-round": {
        "pip": ["auto-round"], "dists": ["auto-round", "transformers"],
        "settings": {"w4g128": {"bits": 4, "group_size": 128},
                     # the release's own "light" recipe (auto_round/cli/main.py RECIPES): its default 200
                     # iterations would take about 3 h on these 2 cores (w4g128-iters2 check: ~15 s per block)
                     "w4g128-light": {"bits": 4, "group_size": 128, "iters": 50, "lr": 5e-3},
                     "w4g128-iters2": {"bits": 4, "group_size": 128, "iters": 2}}},  # a quick harness check
    "gptqmodel": {
        "pip": ["gptqmodel"], "pip_args": ["--no-build-isolation"], "dists": ["gptqmodel", "transformers"],
        "env": {"BUILD_CUDA_EXT": "0", "GPTQMODEL_BUILD_CUDA_EXT": "0", "CUDA_VISIBLE_DEVICES": "",
                # its default CPU pool has (cores + 1) // 2 = 1 worker here, fewer than its own model
                # loader pool asks for (2): "Virtual pool 'model_loader:cpu' requests 2 workers"
                "GPTQMODEL_CPU_WORKERS": "2"},
        "settings": {"gptq-w4g128": {"bits": 4, "group_size": 128}, "gptq-w3g128": {"bits": 3, "group_size": 128}}},
    "hqq": {
        "pip": ["hqq"], "dists": ["hqq", "transformers"],
        "settings": {"w4g64": {"bits": 4, "group_size": 64}, "w4g128": {"bits": 4, "group_size": 128},
                     "w3g64": {"bits": 3, "group_size": 64}}},
}
#: printed under the table for every tool with rows
TOOL_NOTES = {
    "llmcompressor": "group 128 does not run on the 576-wide layers (refused at initialisation; with "
                     "`bypass_divisibility_checks=True` the GPTQ step fails in its observer), so its rows use "
                     "group 64; "
                     "it stores scales in the model's dtype (fp32 here), hence 4.50 / 3.50 bits per weight.",
    "onecomp-orig": "the original authors' release (PyPI onecomp 1.4.0), its GPTQ defaults: symmetric, no act-order, "
                    "damp 0.01; its default (non-QEP) GPTQ calibrates every layer on the fp model's activations in one "
                    "forward pass (no propagation of quantized outputs); g_idx is stored (int32 per input column).",
    "auto-round": "SignRound (sign-gradient tuning of rounding offsets and clipping, block by block), symmetric; "
                  "`w4g128-light` is the release's own light recipe (50 iterations, lr 5e-3; its time is in its row); "
                  "the default 200 iterations, 4x the tuning steps, did not fit in a session beside the other "
                  "runs; calibration windows passed as token tensors.",
    "hqq": "calibration-free; groups run over the flattened matrix, so at group 128 a group can span two rows of a "
           "576-wide layer.",
}
#: our settings (benchmarks/quality.py SETTINGS) compared with the peers
OURS = ["gptq-w4g128", "gptq-w3g128", "gptq+qep-w4g128", "gptq+qep-w3g128", "gptq-w4g64", "gptq+qep-w4g64",
        "gptq-w3g64", "gptq+qep-w3g64"]
#: our settings recorded in quality.json under another name (same config: shrink 0.5 is GPTQ's default)
QUALITY_ALIASES = {"gptq-w4g128-minmax": "gptq-w4g128-shrink0.5"}

#: our method families, as the report names them; a peer row is compared with our rows of its family
FAMILIES = {"gptq": "GPTQ", "gptq+qep": "GPTQ+QEP"}


def venv_python(tool: str) -> Path:
    """The interpreter of a peer's own venv."""
    return VENVS / tool / "bin" / "python"


def family(row: dict) -> str:
    """The comparable method family of a row (our settings; peer rows map by their setting names)."""
    s = row["setting"]
    if s == "fp32":
        return "fp32"
    if "qep" in s:
        return "gptq+qep"
    if row["tool"] in ("hqq",):
        return "rtn-like"
    if row["tool"] == "auto-round":
        return "signround"
    return "gptq"


def settings_for(tool: str, wanted: set[str], fp: bool) -> dict[str, dict]:
    """The settings of ``tool`` to run: its fp32 check only with ``fp``; otherwise its catalogue (ours: OURS, plus
    any benchmarks/quality.py setting named in ``wanted``), narrowed to ``wanted`` when that is not empty."""
    if fp:
        settings = {"fp32": {"fp32": True}}
    elif tool == "ours":
        from quality import SETTINGS as QUALITY_SETTINGS

        settings = {s: {} for s in (OURS + sorted(wanted & set(QUALITY_SETTINGS) - set(OURS)))}
    else:
        settings = TOOLS[tool]["settings"]
    return {name: params for name, params in settings.items() if not wanted or name in wanted}
