"""The plugin contract. Read this file first.

Registration hooks hand a plugin a ``register`` callable; the plugin calls it once
per component class it provides. Observer hooks (``on_*``) receive one context
object each, so their arguments only ever grow. No hook is ``firstresult``:
components are chosen by name from the config, never by hook order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:  # annotations only: importing this module stays cheap (no torch)
    from .components import (Backend, BlockReport, CheckpointInfo, Format, LayerReport, Planner, Quantizer,
                             Refiner, Regularizer, RunInfo, StageInfo, StageReport)

hookspec = pluggy.HookspecMarker("onecomp")
hookimpl = pluggy.HookimplMarker("onecomp")


@hookspec
def register_quantizers(register: Callable[[type[Quantizer]], None]) -> None:
    """Call ``register(cls)`` once per Quantizer class (see onecomp.components.Quantizer)."""


@hookspec
def register_formats(register: Callable[[type[Format]], None]) -> None:
    """Call ``register(cls)`` once per storage Format class (see onecomp.components.Format)."""


@hookspec
def register_planners(register: Callable[[type[Planner]], None]) -> None:
    """Call ``register(cls)`` once per Planner class (see onecomp.components.Planner)."""


@hookspec
def register_refiners(register: Callable[[type[Refiner]], None]) -> None:
    """Call ``register(cls)`` once per Refiner class (see onecomp.components.Refiner)."""


@hookspec
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    """Call ``register(cls)`` once per Backend class (see onecomp.components.Backend)."""


@hookspec
def register_regularizers(register: Callable[[type[Regularizer]], None]) -> None:
    """Call ``register(cls)`` once per Regularizer class (see onecomp.components.Regularizer)."""


@hookspec
def on_run_start(run: RunInfo) -> None:
    """A pipeline run (or ``onecomp.compress``) begins: its config, output dir and plan."""


@hookspec
def on_stage_start(run: RunInfo, stage: StageInfo) -> None:
    """A stage begins: its name, scope and index."""


@hookspec
def on_layer_quantized(run: RunInfo, layer: LayerReport) -> None:
    """One linear layer was quantized: its name, format, bits per weight, error and time."""


@hookspec
def on_block_done(run: RunInfo, block: BlockReport) -> None:
    """One decoder block finished in the layer-wise stage."""


@hookspec
def on_stage_end(run: RunInfo, stage: StageInfo, report: StageReport) -> None:
    """A stage finished; ``stage`` is the same StageInfo ``on_stage_start`` got, ``report`` its results."""


@hookspec
def on_checkpoint_written(run: RunInfo, checkpoint: CheckpointInfo) -> None:
    """A checkpoint directory was written (path and manifest)."""
