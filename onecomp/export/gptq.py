"""The classic GPTQ layout (AutoGPTQ / GPTQModel ``checkpoint_format = "gptq"``), per module:

=========  ===========================  ===========================================================
qweight    int32 ``[in·b/32, out]``      codes of each output column as a little-endian bit stream
qzeros     int32 ``[G, out·b/32]``       zero points minus one (the format's historic offset), packed
scales     float16 ``[G, out]``
g_idx      int32 ``[in]``                group of each input column
=========  ===========================  ===========================================================

plus ``quantize_config.json`` and a ``quantization_config`` (``quant_method = "gptq"``) in config.json.
"""

from __future__ import annotations

import torch

from .affine import AffineInt, pack_rows
from .common import ExportError, split

TARGET = "gptq"
BITS = (2, 3, 4, 8)
ACCEPTS = f"integer groups of {', '.join(map(str, BITS))} bits whose dimensions fill whole int32 words"


def check(name: str, a: AffineInt) -> None:
    out, inp = a.shape
    if a.bits not in BITS:
        raise ExportError(f"module {name}: {a.bits}-bit codes; --to {TARGET} takes {BITS} bits")
    if (inp * a.bits) % 32 or (out * a.bits) % 32:
        raise ExportError(f"module {name}: shape {a.shape} at {a.bits} bits does not fill whole int32 words")


def module_tensors(name: str, a: AffineInt) -> dict[str, torch.Tensor]:
    g_idx = a.static_g_idx() if a.g_idx is None else a.g_idx
    zeros_minus_one = (a.zeros.long() - 1) & (2**a.bits - 1)
    return {f"{name}.qweight": pack_rows(a.q, a.bits).T.contiguous(),
            f"{name}.qzeros": pack_rows(zeros_minus_one.T.contiguous(), a.bits),
            f"{name}.scales": a.scales.to(torch.float16).T.contiguous(),
            f"{name}.g_idx": g_idx.to(torch.int32).contiguous()}


def tensors(model, registry) -> tuple[dict, dict]:
    affine, plain = split(model, TARGET, ACCEPTS, registry)
    if not affine:
        raise ExportError(f"no module of this checkpoint is in an integer format; --to {TARGET} needs at least one")
    params = {(a.bits, a.group_size if a.groups > 1 else -1, a.g_idx is not None) for a in affine.values()}
    if len(params) > 1:
        raise ExportError(f"--to {TARGET} writes one bits/group size/act-order for the whole model; this checkpoint "
                          f"mixes {sorted(params)} — export --to compressed-tensors instead")
    bits, group_size, act_order = params.pop()
    out = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in plain.items()}
    for name, a in affine.items():
        check(name, a)
        out.update(module_tensors(name, a))
    modules = sorted({n.rsplit(".", 1)[-1] for n in affine})
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order, "sym": False,
          "true_sequential": True, "checkpoint_format": "gptq", "damp_percent": 0.01,
          "modules_in_block_to_quantize": [modules]}
    return out, qc
