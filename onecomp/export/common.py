"""What every exporter shares: split a loaded checkpoint into integer-group modules and plain
tensors, refuse formats a target cannot carry, and write the HF-style side files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import quantized_modules, tensors_to_save
from ..errors import OneCompError
from .affine import AffineInt

#: files of a checkpoint directory an export does not copy (it writes its own weights and config)
NOT_COPIED = ("onecomp.json", "config.json", "model.safetensors", "model.safetensors.index.json")


class ExportError(OneCompError):
    """A checkpoint cannot be written in the requested target format."""


def affine_formats(registry) -> list[str]:
    """Registered formats that expose integer groups (``as_affine_int``), which every target accepts."""
    return sorted(n for n in registry.names("format") if hasattr(registry.get("format", n), "as_affine_int"))


def split(model: nn.Module, target: str, accepted: str, registry) -> tuple[dict[str, AffineInt], dict]:
    """``(integer modules by name, every other tensor by state-dict key)``; dense modules become plain
    ``weight`` tensors. A format the target cannot carry is refused, naming what it accepts."""
    affine, plain = {}, {}
    quantized = quantized_modules(model)
    for name, m in quantized.items():
        to_affine = getattr(m.format, "as_affine_int", None)
        if to_affine is not None:
            affine[name] = to_affine(m.stored(), m.shape)
        elif m.format.name == "dense":
            plain[name + ".weight"] = m.dequantize()
        else:
            raise ExportError(
                f"module {name} is in format {m.format.name!r}, which no runtime besides OneComp reads; "
                f"--to {target} accepts {accepted} (formats {', '.join(affine_formats(registry))}) and dense "
                f"modules — load this checkpoint with onecomp.load, or compress with one of those formats")
    buffers = {f"{n}.{t}" for n, m in quantized.items() for t in m.tensor_names}
    for k, v in tensors_to_save(model).items():
        if k not in buffers:
            plain[k] = v
    return affine, plain


def copy_side_files(checkpoint: Path, out: Path) -> None:
    """Tokenizer and generation files from the checkpoint (everything but weights, config, manifest)."""
    for p in checkpoint.iterdir():
        if p.is_file() and p.name not in NOT_COPIED and not p.name.startswith("model-"):
            shutil.copy2(p, out / p.name)


def write_config(model: nn.Module, out: Path, quantization_config: dict | None, dtype: torch.dtype) -> None:
    """``config.json`` of ``model`` with ``quantization_config`` set (or removed) and ``dtype`` recorded."""
    model.config.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg.pop("torch_dtype", None)
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def prepare_out(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ExportError(f"{out} exists and is not empty; pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
