"""Load a model (embedded default, HF directory, HF hub id, .gguf file) and inspect its structure."""

from .structure import BlockInfo, Inspection, inspect_model
from .load import EMBEDDED_MODELS, LoadedModel, load_model

__all__ = ["BlockInfo", "Inspection", "inspect_model", "EMBEDDED_MODELS", "LoadedModel", "load_model"]
