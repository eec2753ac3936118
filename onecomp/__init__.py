"""OneComp: post-training compression of language models, a minimal core plus plugins.

Public API for users and plugin authors::

    import onecomp
    model = onecomp.load("runs/default/01-layerwise")       # a checkpoint, run by the backends' kernels
    onecomp.run("examples/gptq-4bit.toml")                  # a whole pipeline
    onecomp.compress(model, tokenizer, {"plan": ...})      # the same stages on a model object, in place
    from onecomp import hookimpl, Quantizer, Format, LayerTask, Compressed, StageContext
    from onecomp import training                              # the engine training refiners share

Names are imported on first use, so ``import onecomp`` (and the pytest plugin) stays
cheap: torch loads only when a component type is touched.
"""

from importlib import import_module

from ._version import __version__

_EXPORTS = {
    "components": ["Backend", "BackendCapabilities", "BlockReport", "CheckpointInfo", "Compressed", "ComponentSpec",
                   "Format", "LayerReport", "LayerStats", "LayerTask", "NoConfig", "Planner", "Quantizer", "Refiner",
                   "Regularizer", "RunInfo", "StageContext", "StageInfo", "StageReport", "matches",
                   "replace_module", "stored_bits"],
    "validation": ["build_config", "finite", "in_range", "one_of", "positive"],
    "errors": ["CheckpointError", "ConfigError", "DuplicateComponent", "FormatError", "ModelLoadError",
               "OneCompError", "RunError", "UnknownComponent"],
    "calibration.sensitivity": ["output_grad_squares"],
    "hookspecs": ["hookimpl"],
    "registry": ["Registry"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name):
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'onecomp' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_WHERE])


def load(path, registry=None, *, backend="auto", dtype=None, cache_dequantized=False, **kw):
    """A transformers model rebuilt from a onecomp checkpoint directory, ready to run compressed.

    ``backend``: ``"auto"`` (every installed backend, the core ``torch`` last), a backend name, a
    list, or None; each quantized module runs the first kernel a backend offers, else the format's
    reference path (dequantize, then matmul), which keeps the dequantized weight between calls only
    with ``cache_dequantized=True``. ``dtype`` is the dtype of the unquantized parts. ``generate``
    uses the KV cache."""
    from transformers.initialization import no_init_weights

    from .checkpoint import load as _load

    with no_init_weights():  # every weight comes from the checkpoint: random init would only touch pages
        model = _load(path, registry, backend=backend, dtype=dtype, cache_dequantized=cache_dequantized, **kw)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = True  # forward calls stay cache-free (config.use_cache)
    return model


def compress(model, tokenizer=None, config=None, **kw):
    """Compress a model object in place with a pipeline config (no output directory); stage reports."""
    from .pipeline import compress as _compress

    return _compress(model, tokenizer, config, **kw)


def run(config=None, **kw):
    """Run a whole pipeline (a config path, a dict, or None for the embedded default)."""
    from .pipeline import run as _run

    return _run(config, **kw)


__all__ = [*_WHERE, "compress", "load", "run", "__version__"]
