"""Unmerged adapters: small modules that add ``Δy`` to a linear layer's output, kept apart from the base.

An adapter is a weight ``ΔW [out, in]`` in a registered format (e.g. ``lordba``), run through the
format's ``linear()`` so a low-rank format never forms ``ΔW``. It hangs on its base layer through a
forward hook, outside the module tree: the base's ``state_dict`` (and so its checkpoint) stays the
base alone, and adapters are saved, loaded and swapped on their own.

An adapter directory holds ``adapter.safetensors`` (``<layer>.<tensor>``) and ``adapter.json``
(formats, shapes, sha256 of every file), like a checkpoint. A checkpoint directory may carry
adapter directories under ``adapters/``; ``onecomp.load`` attaches those unless told otherwise.
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

from ..components import stored_bits
from ..errors import CheckpointError, UnknownComponent
from .quantlinear import QuantLinear

MANIFEST = "adapter.json"
WEIGHTS = "adapter.safetensors"
SUBDIR = "adapters"  # where a checkpoint directory keeps the adapters it was saved with
CHECKPOINT_MANIFEST = "onecomp.json"  # the checkpoint's own manifest (checkpoint.io imports this module)
_SLOT = "_onecomp_adapter"  # (adapter, hook handle) on the base layer; a plain attribute, not a submodule


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class Adapter(QuantLinear):
    """``Δy = x ΔWᵀ`` from a format's stored tensors, through the format's own ``linear()`` (a low-rank
    format never forms ``ΔW``); no bias."""

    def __init__(self, fmt, shape, tensors: dict):
        super().__init__(fmt, shape, tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.format.linear(x, self.stored(), self.shape)


def attach(model: nn.Module, name: str, adapter: nn.Module) -> None:
    """Add ``adapter(x)`` to the output of the linear layer ``name`` (replacing any adapter there)."""
    base = model.get_submodule(name)
    detach(model, [name])

    def hook(module, args, out):
        return out + adapter(args[0]).to(out.dtype)

    setattr(base, _SLOT, (adapter, base.register_forward_hook(hook)))


def attached(model: nn.Module) -> dict[str, nn.Module]:
    """``{layer name: adapter}`` of every adapter on ``model``."""
    return {n: getattr(m, _SLOT)[0] for n, m in model.named_modules() if hasattr(m, _SLOT)}


def detach(model: nn.Module, names=None) -> dict[str, nn.Module]:
    """Take the adapters off ``names`` (default: all); returns them."""
    out = {}
    for n, m in model.named_modules():
        if hasattr(m, _SLOT) and (names is None or n in names):
            adapter, handle = getattr(m, _SLOT)
            handle.remove()
            delattr(m, _SLOT)
            out[n] = adapter
    return out


def save_adapters(adapters: dict, path, registry, *, base_model: str = "", info: dict | None = None) -> dict:
    """Write ``{layer: Adapter}`` to the directory ``path`` atomically; returns the manifest."""
    from .._version import __version__

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tensors, modules = {}, {}
        for name, a in adapters.items():
            entry = registry.entry("format", a.format.name)
            modules[name] = {"format": a.format.name, "version": type(a.format).version,
                             "params": a.format.to_dict(), "shape": list(a.shape), "dist": entry.dist,
                             "dist_version": entry.version, "bits": stored_bits(a.stored())}
            tensors.update({f"{name}.{k}": v.detach().contiguous() for k, v in a.stored().items()})
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        manifest = {"schema": 1, "kind": "adapters", "onecomp_version": __version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "base_model": base_model,
                    "modules": modules, "bytes": sum(m["bits"] for m in modules.values()) // 8,
                    "info": info or {}, "files": {WEIGHTS: sha256(tmp / WEIGHTS)}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_adapter_manifest(path) -> dict:
    mf = Path(path) / MANIFEST
    if not mf.exists():
        raise CheckpointError(f"{path} is not an adapter directory: {MANIFEST} is missing")
    try:
        return json.loads(mf.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{mf} is corrupted: {exc}") from None


def verify_adapters(path, manifest: dict | None = None) -> None:
    """Raise CheckpointError unless the directory holds exactly the listed files with their sha256."""
    path = Path(path)
    manifest = manifest or read_adapter_manifest(path)
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != {WEIGHTS}:
        raise CheckpointError(f"{path}/{MANIFEST}: files must list exactly {WEIGHTS}")
    extra = sorted(p.name for p in path.iterdir() if p.name not in (MANIFEST, WEIGHTS))
    if extra:
        raise CheckpointError(f"{path}: holds files not listed in {MANIFEST}: {', '.join(extra[:5])}")
    f = path / WEIGHTS
    if not f.is_file() or f.is_symlink():
        raise CheckpointError(f"{path}: {WEIGHTS} listed in {MANIFEST} is missing")
    if sha256(f) != files[WEIGHTS]:
        raise CheckpointError(f"{path}: file {WEIGHTS} is corrupted (sha256 differs from {MANIFEST})")


def add_to_checkpoint(checkpoint, source, name: str) -> Path:
    """Copy the adapter directory ``source`` into ``<checkpoint>/adapters/<name>/`` and list (and hash)
    its files in the checkpoint's manifest, so the checkpoint loads with its adapters attached."""
    checkpoint, source = Path(checkpoint), Path(source)
    verify_adapters(source)
    dest = checkpoint / SUBDIR / name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(source, dest)
    mf = checkpoint / CHECKPOINT_MANIFEST
    manifest = json.loads(mf.read_text())
    for f in (MANIFEST, WEIGHTS):
        manifest["files"][f"{SUBDIR}/{name}/{f}"] = sha256(dest / f)
    tmp = mf.with_name(f".{mf.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, mf)
    return dest


def load_adapters(path, registry=None, *, check_hashes: bool = True) -> dict[str, Adapter]:
    """``{layer: Adapter}`` from an adapter directory, every format checked."""
    from ..registry import Registry

    registry = registry or Registry.default()
    path = Path(path)
    manifest = read_adapter_manifest(path)
    if check_hashes:
        verify_adapters(path, manifest)
    tensors = load_file(path / WEIGHTS)
    out = {}
    for name, entry in manifest["modules"].items():
        try:
            cls = registry.get("format", entry["format"])
        except UnknownComponent:
            raise CheckpointError(f"{path}: adapter {name} uses format {entry['format']!r}, which no installed "
                                  f"plugin provides; pip install {entry.get('dist', 'its plugin')}") from None
        if entry["version"] > cls.version:
            raise CheckpointError(f"{path}: format {entry['format']!r} version {entry['version']} is newer than "
                                  f"the installed {cls.version}")
        fmt, shape, prefix = cls.from_dict(entry["params"]), tuple(entry["shape"]), name + "."
        stored = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            fmt.check(stored, shape)
        except Exception as exc:
            raise CheckpointError(f"{path}: adapter {name}: {exc}") from None
        out[name] = Adapter(fmt, shape, stored)
    return out


def attach_adapters(model: nn.Module, checkpoint, adapters=None, registry=None, *, check_hashes: bool = True
                    ) -> nn.Module:
    """Attach adapter directories to ``model``: ``adapters`` (paths) or, when None, those saved
    under ``<checkpoint>/adapters/``; ``[]`` attaches none. A layer the model lacks is an error."""
    if adapters is None:
        sub = Path(checkpoint) / SUBDIR
        adapters = sorted(p for p in sub.iterdir() if (p / MANIFEST).exists()) if sub.is_dir() else []
    for source in adapters:
        for name, adapter in load_adapters(source, registry, check_hashes=check_hashes).items():
            try:
                base = model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(f"{source}: adapter for {name}, a layer the model does not have") from None
            if (getattr(base, "out_features", None), getattr(base, "in_features", None)) != adapter.shape:
                raise CheckpointError(f"{source}: adapter {name} is {adapter.shape}, the layer is "
                                      f"{(base.out_features, base.in_features)}")
            attach(model, name, adapter)
    return model
