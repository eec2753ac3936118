"""Reading compressed-tensors ``pack-quantized`` directories that another tool wrote (llm-compressor),
so ``onecomp.load`` and ``onecomp eval`` evaluate them like our own checkpoints. The layout is
described in ``compressed_tensors.py`` beside this file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ModelLoadError
from .affine import AffineInt, unpack_rows

def is_pack_quantized(path: Path) -> bool:
    """True for a directory whose config.json declares compressed-tensors ``pack-quantized`` weights."""
    try:
        qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
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
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..checkpoint.shards import read_weights

    path = Path(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    qc = config.quantization_config
    if not isinstance(qc, dict):
        qc = qc.to_dict()
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise ModelLoadError(f"{path}: quantization_status {status!r}; only 'compressed' checkpoints are read")
    del config.quantization_config
    tensors = read_weights(path)
    names = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_packed")})
    for name in names:
        stored = {k.rsplit(".", 1)[1]: tensors.pop(k) for k in list(tensors) if k.rsplit(".", 1)[0] == name
                  and k.rsplit(".", 1)[1].startswith("weight_")}
        tensors[name + ".weight"] = affine_from_stored(name, stored, _weights_args(qc, name)).dequantize()
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not (k.endswith("lm_head.weight") and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelLoadError(f"{path}: tensors do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()
