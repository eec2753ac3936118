"""compressed-tensors ``pack-quantized`` checkpoints (what llm-compressor writes; vLLM and
transformers read them): export from integer-group modules, and import for evaluation.

Per quantized module: ``weight_packed`` int32 ``[out, ceil(in·b/32)]`` (codes ``q − 2^(b−1)``
packed by ``pack_to_int32``, i.e. the unsigned codes as one little-endian bit stream per row),
``weight_scale`` ``[out, G]``, ``weight_zero_point`` int32 ``[ceil(out·b/32), G]`` (zero points
packed along the output dimension; only when some zero point is not 2^(b−1), i.e. asymmetric),
``weight_shape`` int64 ``[2]``, and ``weight_g_idx`` only in checkpoints of older tools.

transformers 5.x with compressed-tensors 0.20 loads symmetric files; it refuses asymmetric ones
with a size mismatch of ``weight_zero_point`` (it builds the module unpacked), while vLLM reads
the packed zero points llm-compressor writes, which is what we write.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .affine import AffineInt, pack_rows
from .common import ExportError, split

TARGET = "compressed-tensors"
ACCEPTS = "integer groups of 1-8 bits whose group size divides in_features, without act-order g_idx"


def symmetric(a: AffineInt) -> bool:
    """Every zero point is the code midpoint 2^(b−1): ``Ŵ = s·(q − 2^(b−1))`` needs no zero point."""
    return bool((a.zeros == 1 << (a.bits - 1)).all())


def scheme(a: AffineInt) -> dict:
    """The ``weights`` block of a config group for ``a``."""
    per_row = a.groups == 1
    return {"num_bits": a.bits, "type": "int", "symmetric": symmetric(a), "strategy": "channel" if per_row else "group",
            "group_size": None if per_row else a.group_size, "dynamic": False, "actorder": None,
            "block_structure": None, "observer": "minmax", "observer_kwargs": {}}


def check(name: str, a: AffineInt) -> None:
    out, inp = a.shape
    if not 1 <= a.bits <= 8:
        raise ExportError(f"module {name}: {a.bits}-bit codes; --to {TARGET} packs 1 to 8 bits")
    if not a.has_static_groups():
        raise ExportError(f"module {name} was quantized with act-order (its columns carry a g_idx), which "
                          f"compressed-tensors no longer reads (actorder='group' was removed); re-run with "
                          f"act_order = false, or export --to gptq, which keeps g_idx")
    if a.groups > 1 and inp % a.group_size:
        raise ExportError(f"module {name}: group size {a.group_size} does not divide in_features {inp}; "
                          f"compressed-tensors needs whole groups")


def module_tensors(name: str, a: AffineInt, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out, inp = a.shape
    stored = {f"{name}.weight_packed": pack_rows(a.q, a.bits),
              f"{name}.weight_scale": a.scales.to(scale_dtype).contiguous(),
              f"{name}.weight_shape": torch.tensor([out, inp], dtype=torch.int64)}
    if not symmetric(a):
        stored[f"{name}.weight_zero_point"] = pack_rows(a.zeros.T, a.bits).T.contiguous()
    return stored


def config_block(affine: dict[str, AffineInt], linear_names: list[str]) -> dict:
    groups: dict[str, dict] = {}
    for name, a in affine.items():
        key = json.dumps(scheme(a), sort_keys=True)
        groups.setdefault(key, {"targets": [], "weights": scheme(a), "input_activations": None,
                                "output_activations": None, "format": "pack-quantized"})["targets"].append(name)
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
            "ignore": [n for n in linear_names if n not in affine], "kv_cache_scheme": None,
            "global_compression_ratio": None}


def tensors(model, registry) -> tuple[dict, dict]:
    """``(state dict to write, quantization_config)`` of a loaded checkpoint."""
    affine, plain = split(model, TARGET, ACCEPTS, registry)
    if not affine:
        raise ExportError(f"no module of this checkpoint is in an integer format; --to {TARGET} needs at least one")
    dtype = next(iter(plain.values())).dtype if plain else torch.float32
    scale_dtype = torch.float32 if dtype == torch.float32 else torch.float16
    out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in plain.items()}
    for name, a in affine.items():
        check(name, a)
        out.update(module_tensors(name, a, scale_dtype))
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or n in affine]
    return out, config_block(affine, linear_names)


# ---------------------------------------------------------------- import


def is_pack_quantized(path: Path) -> bool:
    """True for a directory whose config.json declares compressed-tensors ``pack-quantized`` weights."""
    try:
        qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return qc.get("quant_method") == "compressed-tensors" and "pack-quantized" in _formats(qc)


def _formats(qc: dict) -> set[str]:
    return {qc.get("format")} | {g.get("format") for g in (qc.get("config_groups") or {}).values()}


def _unpack_rows(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    rows = packed.shape[0]
    unsigned = torch.cat([packed.long() & 0xFFFFFFFF, torch.zeros(rows, 1, dtype=torch.long)], 1)
    offset = torch.arange(n) * bits
    word, shift = offset // 32, offset % 32
    return ((unsigned[:, word] | (unsigned[:, word + 1] << 32)) >> shift) & (2**bits - 1)


def _weights_args(qc: dict, name: str) -> dict:
    import re

    for g in (qc.get("config_groups") or {}).values():
        for t in g.get("targets", []):
            if t == name or (t.startswith("re:") and re.match(t[3:], name)) or t == "Linear":
                return g["weights"]
    raise ExportError(f"module {name} holds weight_packed but no config group of quantization_config targets it")


def affine_from_stored(name: str, stored: dict, args: dict) -> AffineInt:
    """An AffineInt from one module's ``weight_*`` tensors and its ``weights`` quantization args."""
    if args.get("type", "int") != "int":
        raise ExportError(f"module {name}: only integer pack-quantized weights are read, got type {args['type']!r}")
    bits, offset = int(args["num_bits"]), 1 << (int(args["num_bits"]) - 1)
    out, inp = (int(v) for v in stored["weight_shape"].tolist())
    scales = stored["weight_scale"].reshape(out, -1)
    G = scales.shape[1]
    q = _unpack_rows(stored["weight_packed"], inp, bits)
    if "weight_zero_point" in stored and not args.get("symmetric", True):
        zeros = _unpack_rows(stored["weight_zero_point"].T.contiguous(), out, bits).T
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
    from ..errors import ModelLoadError

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
