"""OneComp: post-training compression of language models, a minimal core plus plugins.

Public API for users and plugin authors::

    import onecomp
    model = onecomp.load("runs/default/01-layerwise")       # a checkpoint
    onecomp.run("examples/gptq-4bit.toml")                  # a whole pipeline
    from onecomp import hookimpl, Quantizer, Format, LayerTask, Compressed
"""

__version__ = "0.1.0"

from .components import (Backend, Compressed, ComponentSpec, Format, LayerStats, LayerTask, NoConfig, Planner,
                         Quantizer, Refiner, Regularizer, matches, stored_bits)
from .config import in_range, one_of
from .errors import (CheckpointError, ConfigError, DuplicateComponent, FormatError, ModelLoadError, OneCompError,
                     UnknownComponent)
from .hookspecs import hookimpl
from .registry import Registry


def load(path, registry=None, **kw):
    """A transformers model rebuilt from a onecomp checkpoint directory."""
    from .checkpoint import load as _load

    return _load(path, registry, **kw)


def run(config=None, **kw):
    """Run a whole pipeline (a config path, a dict, or None for the embedded default)."""
    from .pipeline import run as _run

    return _run(config, **kw)


__all__ = ["Backend", "Compressed", "ComponentSpec", "Format", "LayerStats", "LayerTask", "NoConfig", "Planner",
           "Quantizer", "Refiner", "Regularizer", "matches", "stored_bits", "in_range", "one_of", "CheckpointError",
           "ConfigError", "DuplicateComponent", "FormatError", "ModelLoadError", "OneCompError", "UnknownComponent",
           "hookimpl", "Registry", "load", "run", "__version__"]
