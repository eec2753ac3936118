"""Reading checkpoints another tool wrote, so ``onecomp.load`` and ``onecomp eval`` evaluate them like
our own: compressed-tensors ``pack-quantized`` directories (llm-compressor; the layout is described in
``compressed_tensors.py``) here, the classic GPTQ layout in ``gptq_import.py``. What both share (building
the model and placing each dequantized layer) is here too; ``onecomp.checkpoint.io.foreign_reader``
picks the reader of a directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from ..errors import ModelLoadError
from .affine import AffineInt, unpack_rows


def plain_config(path: Path):
    """The directory's transformers config without its ``quantization_config`` (returned beside it as
    a dict), so the model is built as an ordinary fp model."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"{path}/config.json cannot be used: {exc}") from None
    qc = getattr(config, "quantization_config", None) or {}
    if not isinstance(qc, dict):
        qc = qc.to_dict()
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config, qc


def model_with_layers(path: Path, config, tensors: dict, dtype: torch.dtype, marker: str, suffixes: tuple,
                      check_layer: Callable) -> torch.nn.Module:
    """A transformers model of ``config`` holding ``tensors``. Each module with a ``{name}.{marker}`` tensor
    is a packed layer: ``check_layer(name, stored, (out, in))`` checks its tensors (those named in
    ``suffixes``) and returns the function that dequantizes them into its weight. Every layer and every
    other tensor is checked against the model's shapes (built on the meta device) before the model is
    allocated or anything unpacked; a tensor too many, too few or of another shape is a ModelLoadError."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = {}
    for key in sorted(k for k in tensors if k.endswith("." + marker)):
        name = key[: -len(marker) - 1]
        try:
            linear = skeleton.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, torch.nn.Linear):
            raise ModelLoadError(f"{path}: tensor {key} belongs to no linear layer of the model config.json describes")
        stored = {s: tensors.pop(f"{name}.{s}") for s in suffixes if f"{name}.{s}" in tensors}
        layers[name] = check_layer(name, stored, (linear.out_features, linear.in_features))
    shapes = {k: tuple(t.shape) for k, t in skeleton.state_dict().items()}
    ties = getattr(config, "tie_word_embeddings", False)
    optional = set(getattr(skeleton, "_tied_weights_keys", None) or []) | {k for k in shapes if ties and
                                                                            k.endswith("lm_head.weight")}
    del skeleton
    placed = {name + ".weight" for name in layers}
    missing = [k for k in shapes if k not in tensors and k not in placed and k not in optional]
    unexpected = [k for k in tensors if k not in shapes or k in placed]
    wrong = [f"{k} {list(t.shape)} (the model's is {list(shapes[k])})" for k, t in tensors.items()
             if k in shapes and tuple(t.shape) != shapes[k]]
    if missing or unexpected or wrong:
        raise ModelLoadError(f"{path}: tensors do not match the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}, of another shape {wrong[:5]}")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(tensors, strict=False)
    with torch.no_grad():
        for name, dequantize in layers.items():
            model.get_submodule(name).weight.copy_(dequantize())
    if ties:
        model.tie_weights()
    model.config.use_cache = False
    return model.eval()


# ---------------------------------------------------------------- compressed-tensors pack-quantized


def is_pack_quantized(path: Path) -> bool:
    """True for a directory whose config.json declares compressed-tensors ``pack-quantized`` weights."""
    try:
        qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return qc.get("quant_method") == "compressed-tensors" and "pack-quantized" in _formats(qc)


def _formats(qc: dict) -> set[str]:
    return {qc.get("format")} | {g.get("format") for g in (qc.get("config_groups") or {}).values()}


def _weights_args(qc: dict, name: str) -> dict:
    import re

    for g in (qc.get("config_groups") or {}).values():
        for t in g.get("targets", []):
            if t == name or (t.startswith("re:") and re.match(t[3:], name)) or t == "Linear":
                return g["weights"]
    raise ModelLoadError(f"module {name} holds weight_packed but no config group of quantization_config targets it")


def affine_from_stored(name: str, stored: dict, args: dict) -> AffineInt:
    """An AffineInt from one module's ``weight_*`` tensors and its ``weights`` quantization args."""
    if args.get("type", "int") != "int":
        raise ModelLoadError(f"module {name}: only integer pack-quantized weights are read, got type {args['type']!r}")
    bits, offset = int(args["num_bits"]), 1 << (int(args["num_bits"]) - 1)
    out, inp = (int(v) for v in stored["weight_shape"].tolist())
    scales = stored["weight_scale"].reshape(out, -1)
    G = scales.shape[1]
    q = unpack_rows(stored["weight_packed"], inp, bits)
    if "weight_zero_point" in stored and not args.get("symmetric", True):
        zeros = unpack_rows(stored["weight_zero_point"].T.contiguous(), out, bits).T
    else:
        zeros = torch.full((out, G), offset, dtype=torch.long)
    g_idx = stored.get("weight_g_idx")
    group = inp if G == 1 else int(args.get("group_size") or inp)
    return AffineInt(bits, group, q, zeros, scales, None if g_idx is None else g_idx.long())


def load_pack_quantized(path: Path, dtype: torch.dtype = torch.float32):
    """A transformers model from a pack-quantized directory, each packed layer dequantized into its
    ``nn.Linear`` (what evaluation needs; the model is then an ordinary fp model)."""
    from ..checkpoint.shards import read_weights

    path = Path(path)
    config, qc = plain_config(path)
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise ModelLoadError(f"{path}: quantization_status {status!r}; only 'compressed' checkpoints are read")

    def check_layer(name, stored, shape):
        if "weight_shape" not in stored or tuple(stored["weight_shape"].tolist()) != shape:
            raise ModelLoadError(f"{path}: module {name}: weight_shape "
                                 f"{stored['weight_shape'].tolist() if 'weight_shape' in stored else 'missing'}, "
                                 f"the model's layer is {list(shape)}")
        args = _weights_args(qc, name)
        return lambda: affine_from_stored(name, stored, args).dequantize()

    suffixes = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
    return model_with_layers(path, config, read_weights(path), dtype, "weight_packed", suffixes, check_layer)
