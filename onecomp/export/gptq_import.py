"""Reading classic GPTQ-layout directories that another tool wrote (GPTQModel, AutoGPTQ, auto-round's
``auto_gptq`` format), so ``onecomp.load`` and ``onecomp eval`` evaluate them like our own checkpoints.
The layout is described in ``gptq.py`` beside this file; every tensor's shape and every ``g_idx`` value
is checked against the model's layer before anything is unpacked."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..errors import ModelLoadError
from .affine import AffineInt, unpack_rows
from .pack_quantized import model_with_layers, plain_config

#: the code widths of the layout (``gptq.BITS``, not imported: gptq.py reaches onecomp.checkpoint, which imports this)
BITS = (2, 3, 4, 8)
#: ``checkpoint_format`` → what is added to a stored zero point (v1 stores zero − 1, v2 the zero itself)
ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def gptq_config(path: Path) -> dict | None:
    """The GPTQ settings of a directory: config.json's ``quantization_config`` when it declares
    ``quant_method = "gptq"`` (over ``quantize_config.json``, which fills in what it lacks), else
    ``quantize_config.json`` alone when config.json has no block; None for any other directory. A OneComp
    checkpoint's block declares gptq too, with an ``onecomp`` entry: it is not one."""
    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
        qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    except (OSError, ValueError):
        return None
    try:
        side = json.loads((path / "quantize_config.json").read_text())
    except (OSError, ValueError):
        side = None
    if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "gptq" and "onecomp" not in qc:
        return {**(side if isinstance(side, dict) else {}), **qc}
    if qc is None and isinstance(side, dict) and "bits" in side:
        return side
    return None


def is_gptq(path: Path) -> bool:
    return gptq_config(path) is not None


def _settings(path: Path, qc: dict) -> tuple[int, int, int]:
    """``(bits, group_size, zero offset)``, each checked; -1 as group size means one group per row."""
    bits, group_size = qc.get("bits"), qc.get("group_size", -1)
    if bits not in BITS:
        raise ModelLoadError(f"{path}: GPTQ bits {bits!r}; {', '.join(map(str, BITS))} are read")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size == 0 or group_size < -1:
        raise ModelLoadError(f"{path}: GPTQ group_size {group_size!r} is not a positive integer or -1")
    fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
    if fmt not in ZERO_OFFSET:
        raise ModelLoadError(f"{path}: GPTQ checkpoint_format {fmt!r}; {', '.join(ZERO_OFFSET)} are read")
    pack_dtype = str(qc.get("pack_dtype", "int32")).removeprefix("torch.")
    if pack_dtype != "int32":
        raise ModelLoadError(f"{path}: GPTQ pack_dtype {pack_dtype!r}; only int32 words are read")
    return bits, group_size, ZERO_OFFSET[fmt]


def _expect(where: str, stored: dict, key: str, shape: tuple, integer: bool) -> torch.Tensor:
    t = stored.get(key)
    if t is None:
        raise ModelLoadError(f"{where}: tensor {key} is missing")
    if tuple(t.shape) != shape:
        raise ModelLoadError(f"{where}: tensor {key} has shape {list(t.shape)}, the layer needs {list(shape)}")
    if integer and t.dtype != torch.int32:
        raise ModelLoadError(f"{where}: tensor {key} is {t.dtype}, the GPTQ layout packs int32")
    if not integer and not t.is_floating_point():
        raise ModelLoadError(f"{where}: tensor {key} is {t.dtype}, not floating point")
    return t


def check_gptq_layer(where: str, stored: dict, shape: tuple[int, int], bits: int, group_size: int,
                     act_order: bool = False) -> int:
    """Check one layer's qweight / qzeros / scales / g_idx against its ``(out, in)`` shape and the settings,
    before anything is unpacked; the columns per group of its static groups (unused with a g_idx)."""
    out, inp = shape
    scales = stored.get("scales")
    if scales is None or scales.dim() != 2 or scales.shape[0] < 1:
        raise ModelLoadError(f"{where}: tensor scales is {'missing' if scales is None else list(scales.shape)}, "
                             f"the layer needs [groups, {out}]")
    groups = scales.shape[0]
    _expect(where, stored, "scales", (groups, out), integer=False)
    if not bool(torch.isfinite(scales).all()):
        raise ModelLoadError(f"{where}: tensor scales holds non-finite values")
    _expect(where, stored, "qweight", (math.ceil(inp * bits / 32), out), integer=True)
    _expect(where, stored, "qzeros", (groups, math.ceil(out * bits / 32)), integer=True)
    g_idx = stored.get("g_idx")
    if g_idx is not None:
        if tuple(g_idx.shape) != (inp,) or g_idx.is_floating_point() or g_idx.is_complex():
            raise ModelLoadError(f"{where}: tensor g_idx is {g_idx.dtype} {list(g_idx.shape)}, the layer needs "
                                 f"integer [{inp}]")
        if inp and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise ModelLoadError(f"{where}: tensor g_idx holds groups {int(g_idx.min())}..{int(g_idx.max())}, "
                                 f"scales has {groups}")
    elif act_order:
        raise ModelLoadError(f"{where}: tensor g_idx is missing, and desc_act is set")
    elif groups > 1 and not (group_size > 0 and groups == math.ceil(inp / group_size)):
        raise ModelLoadError(f"{where}: tensor g_idx is missing, and {groups} groups of scales do not follow "
                             f"from group_size {group_size} over {inp} inputs")
    return inp if groups == 1 else (group_size if group_size > 0 else math.ceil(inp / groups))


def affine_from_gptq(stored: dict, shape: tuple[int, int], bits: int, group_size: int, zero_offset: int) -> AffineInt:
    """An AffineInt from one layer's tensors, checked by ``check_gptq_layer`` (``group_size`` what it returned).
    A v1 zero is the stored code plus one, modulo 2^bits (as our exporter writes it)."""
    out, inp = shape
    g_idx = stored.get("g_idx")
    q = unpack_rows(stored["qweight"].T.contiguous(), inp, bits)  # [out, in]
    zeros = (unpack_rows(stored["qzeros"], out, bits) + zero_offset) & (2**bits - 1)  # [G, out]
    return AffineInt(bits, group_size, q, zeros.T, stored["scales"].T, None if g_idx is None else g_idx.long())


def load_gptq(path: Path, dtype: torch.dtype = torch.float32):
    """A transformers model from a GPTQ-layout directory, each packed layer dequantized into its
    ``nn.Linear`` (what evaluation needs; the model is then an ordinary fp model)."""
    from ..checkpoint.shards import read_weights

    path = Path(path)
    qc = gptq_config(path) or {}
    bits, group_size, zero_offset = _settings(path, qc)
    act_order = bool(qc.get("desc_act", False))
    config, _ = plain_config(path)

    def check_layer(name, stored, shape):
        size = check_gptq_layer(f"{path}: module {name}", stored, shape, bits, group_size, act_order)
        return lambda: affine_from_gptq(stored, shape, bits, size, zero_offset).dequantize()

    return model_with_layers(path, config, read_weights(path), dtype, "qweight", SUFFIXES, check_layer)
