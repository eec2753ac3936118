"""Checkpoints (safetensors + onecomp.json manifest) and the QuantLinear module."""

from .blocks import BlockStore
from .io import bits_summary, load, quantized_modules, read_manifest, save_checkpoint, tensors_to_save, verify
from .quantlinear import QuantLinear

__all__ = ["BlockStore", "QuantLinear", "bits_summary", "load", "quantized_modules", "read_manifest", "save_checkpoint", "tensors_to_save", "verify"]
