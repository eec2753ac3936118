"""compressed-tensors ``pack-quantized`` checkpoints (what llm-compressor writes; vLLM and
transformers read them): the export from integer-group modules.

Per quantized module: ``weight_packed`` int32 ``[out, ceil(in·b/32)]`` (codes ``q − 2^(b−1)``
packed by ``pack_to_int32``, i.e. the unsigned codes as one little-endian bit stream per row),
``weight_scale`` ``[out, G]``, ``weight_zero_point`` int32 ``[ceil(out·b/32), G]`` (zero points
packed along the output dimension; only when some zero point is not 2^(b−1), i.e. asymmetric),
``weight_shape`` int64 ``[2]``, and ``weight_g_idx`` only in checkpoints of older tools.

Reading such files back: ``pack_quantized.py``. transformers 5.x with compressed-tensors 0.20 loads
symmetric files; it refuses asymmetric ones
with a size mismatch of ``weight_zero_point`` (it builds the module unpacked), while vLLM reads
the packed zero points llm-compressor writes, which is what we write.
"""

from __future__ import annotations

import json

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
