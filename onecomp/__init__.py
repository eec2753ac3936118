"""OneComp: post-training compression of language models, a minimal core plus plugins.

Public API for users and plugin authors::

    import onecomp
    model = onecomp.load("runs/default/01-layerwise")       # a checkpoint
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


def load(path, registry=None, **kw):
    """A transformers model rebuilt from a onecomp checkpoint directory."""
    from .checkpoint import load as _load

    return _load(path, registry, **kw)


def compress(model, tokenizer=None, config=None, **kw):
    """Compress a model object in place with a pipeline config (no output directory); stage reports."""
    from .pipeline import compress as _compress

    return _compress(model, tokenizer, config, **kw)


def run(config=None, **kw):
    """Run a whole pipeline (a config path, a dict, or None for the embedded default)."""
    from .pipeline import run as _run

    return _run(config, **kw)


__all__ = [*_WHERE, "compress", "load", "run", "__version__"]
