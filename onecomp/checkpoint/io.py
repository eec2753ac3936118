"""Checkpoint directories: HF-style files + ``model.safetensors`` + the ``onecomp.json`` manifest.

Writes are atomic: everything goes to a temporary sibling directory which is renamed
into place, so a crash never leaves a half-written checkpoint under the final name.
No pickle; the manifest names formats by registered name, never by class path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..components import replace_module, stored_bits
from ..errors import CheckpointError, UnknownComponent
from .quantlinear import QuantLinear

MANIFEST = "onecomp.json"
WEIGHTS = "model.safetensors"
SCHEMA = 1


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def tensors_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied duplicates dropped (safetensors refuses shared storage)."""
    out, seen = {}, {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = k
        out[k] = v.detach().contiguous()
    return out


def module_entries(model: nn.Module, registry) -> dict:
    entries = {}
    for name, m in quantized_modules(model).items():
        entry = registry.entry("format", m.format.name)
        entries[name] = {"format": m.format.name, "version": type(m.format).version,
                         "params": m.format.to_dict(), "shape": list(m.shape),
                         "dist": entry.dist, "dist_version": entry.version, "bits": stored_bits(m.stored())}
    return entries


def bits_summary(model: nn.Module) -> dict:
    """Exact bits per weight over the quantized layers, from the stored tensors."""
    mods = quantized_modules(model)
    bits = sum(stored_bits(m.stored()) for m in mods.values())
    numel = sum(m.out_features * m.in_features for m in mods.values())
    total = sum(t.numel() * t.element_size() for t in tensors_to_save(model).values())
    return {"bits_per_weight": bits / numel if numel else None, "quantized_weights": numel,
            "quantized_bits": bits, "model_bytes": total}


def save_checkpoint(model: nn.Module, tokenizer, path: str | os.PathLike, registry, *,
                    base_model: str, config: dict, stages: list) -> dict:
    """Write ``model`` to ``path`` atomically and return the manifest."""
    from .._version import __version__

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors_to_save(model), tmp / WEIGHTS, metadata={"format": "pt"})
        files = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "schema": SCHEMA,
            "onecomp_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "base_model": base_model,
            "config": config,
            "modules": module_entries(model, registry),
            "bits": bits_summary(model),
            "files": files,
            "stages": stages,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if path.exists():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    mf = path / MANIFEST
    if not mf.exists():
        raise CheckpointError(f"{path} is not a onecomp checkpoint: {MANIFEST} is missing")
    try:
        return json.loads(mf.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{mf} is corrupted: {exc}") from None


def verify(path: str | os.PathLike, manifest: dict | None = None) -> None:
    """Raise CheckpointError unless every file listed in the manifest has its recorded sha256."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    for name, digest in manifest.get("files", {}).items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"{path}: file {name} listed in {MANIFEST} is missing")
        if sha256(f) != digest:
            raise CheckpointError(f"{path}: file {name} is corrupted (sha256 differs from {MANIFEST})")


def load(path: str | os.PathLike, registry=None, *, check_hashes: bool = True, dtype=None) -> nn.Module:
    """A transformers model with QuantLinear modules rebuilt from a onecomp checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..registry import Registry

    registry = registry or Registry.default()
    path = Path(path)
    manifest = read_manifest(path)
    if check_hashes:
        verify(path, manifest)
    formats = {}
    for name, entry in manifest["modules"].items():
        try:
            cls = registry.get("format", entry["format"])
        except UnknownComponent:
            raise CheckpointError(
                f"{path}: module {name} uses format {entry['format']!r}, which no installed plugin provides; "
                f"install {entry.get('dist', 'its plugin')} (pip install {entry.get('dist', '')})") from None
        if entry["version"] > cls.version:
            raise CheckpointError(f"{path}: format {entry['format']!r} version {entry['version']} is newer than the "
                                  f"installed {cls.version}; upgrade {entry.get('dist', 'its plugin')}")
        formats[name] = cls.from_dict(entry["params"])
    try:
        tensors = load_file(path / WEIGHTS)
    except Exception as exc:
        raise CheckpointError(f"{path}/{WEIGHTS} cannot be read: {exc}") from None
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or getattr(config, "dtype", None) or torch.float32)
    for name, entry in manifest["modules"].items():
        linear = model.get_submodule(name)
        prefix = name + "."
        stored = {k[len(prefix):]: tensors.pop(k) for k in list(tensors)
                  if k.startswith(prefix) and k[len(prefix):] != "bias"}
        bias = tensors.pop(prefix + "bias", None)
        fmt, shape = formats[name], tuple(entry["shape"])
        try:
            fmt.check(stored, shape)
        except Exception as exc:
            raise CheckpointError(f"{path}: module {name}: {exc}") from None
        replace_module(model, name, QuantLinear(fmt, shape, stored, bias))
        del linear
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    placed = tuple(name + "." for name in manifest["modules"])  # QuantLinear tensors, set above
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight") and not k.startswith(placed)]
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    model.config.use_cache = False
    return model
