"""The plugin contract. Read this file first.

Registration hooks hand a plugin a ``register`` callable; the plugin calls it once
per component class it provides. Observer hooks (``on_*``) receive one context
object each, so their arguments only ever grow. No hook is ``firstresult``:
components are chosen by name from the config, never by hook order.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("onecomp")
hookimpl = pluggy.HookimplMarker("onecomp")


@hookspec
def register_quantizers(register):
    """Call ``register(cls)`` once per Quantizer class (see onecomp.components.Quantizer)."""


@hookspec
def register_formats(register):
    """Call ``register(cls)`` once per storage Format class (see onecomp.components.Format)."""


@hookspec
def register_planners(register):
    """Call ``register(cls)`` once per Planner class (see onecomp.components.Planner)."""


@hookspec
def register_refiners(register):
    """Call ``register(cls)`` once per Refiner class (see onecomp.components.Refiner)."""


@hookspec
def register_backends(register):
    """Call ``register(cls)`` once per Backend class (see onecomp.components.Backend)."""


@hookspec
def register_regularizers(register):
    """Call ``register(cls)`` once per Regularizer class (see onecomp.components.Regularizer)."""


@hookspec
def on_run_start(run):
    """A pipeline run begins; ``run`` is a RunInfo (config, output dir, plan)."""


@hookspec
def on_stage_start(run, stage):
    """A stage begins; ``stage`` is a StageInfo (name, scope, index)."""


@hookspec
def on_layer_quantized(run, layer):
    """One linear layer was quantized; ``layer`` is a LayerReport (name, format, error, seconds)."""


@hookspec
def on_block_done(run, block):
    """One decoder block finished in the layer-wise stage; ``block`` is a BlockReport."""


@hookspec
def on_stage_end(run, stage):
    """A stage finished; ``stage`` is the StageReport written to disk."""


@hookspec
def on_checkpoint_written(run, checkpoint):
    """A checkpoint directory was written; ``checkpoint`` is a CheckpointInfo (path, manifest)."""
