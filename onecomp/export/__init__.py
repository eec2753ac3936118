"""Export a OneComp checkpoint to a format other runtimes read, and import theirs.

``export(checkpoint, target, out)`` with target ``compressed-tensors`` (vLLM, transformers),
``gptq`` (the classic AutoGPTQ layout) or ``gguf`` (llama.cpp). Integer formats take part by
exposing ``as_affine_int(stored, shape) -> AffineInt``; formats without it are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from .affine import AffineInt, pack_rows, unpack_rows
from .common import ExportError

TARGETS = ("compressed-tensors", "gptq", "gguf")

__all__ = ["AffineInt", "ExportError", "TARGETS", "export", "pack_rows", "unpack_rows"]


def export(checkpoint, target: str, out, *, registry=None, force: bool = False, shard_size=None) -> Path:
    """Write the checkpoint at ``checkpoint`` as ``target`` under ``out`` (a directory; a file for gguf)."""
    import torch

    from ..checkpoint import load
    from ..checkpoint.shards import DEFAULT_SHARD_SIZE, write_weights
    from ..registry import Registry
    from . import common

    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
    registry = registry or Registry.default()
    checkpoint, out = Path(checkpoint), Path(out)
    model = load(checkpoint, registry)
    if target == "gguf":
        from .gguf import write_gguf

        return write_gguf(model, checkpoint, out, registry, force=force)
    if target == "compressed-tensors":
        from .compressed_tensors import tensors
    else:
        from .gptq import tensors
    state, qc = tensors(model, registry)
    common.prepare_out(out, force)
    dtype = next((v.dtype for k, v in state.items() if k.endswith("embed_tokens.weight")), torch.float32)
    common.write_config(model, out, qc, dtype)
    common.copy_side_files(checkpoint, out)
    write_weights(state, out, shard_size or DEFAULT_SHARD_SIZE)
    if target == "gptq":
        (out / "quantize_config.json").write_text(json.dumps({k: v for k, v in qc.items() if k != "quant_method"},
                                                             indent=2) + "\n")
    return out
