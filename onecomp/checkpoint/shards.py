"""Weight files as ``save_pretrained`` writes them: one ``model.safetensors``, or shards
``model-00001-of-0000N.safetensors`` with a ``model.safetensors.index.json`` once the tensors
exceed the shard size; readers accept either."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

WEIGHTS = "model.safetensors"
INDEX = WEIGHTS + ".index.json"
DEFAULT_SHARD_SIZE = 5 * 10**9  # bytes, save_pretrained's "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(value) -> int:
    """Bytes from an int or a string like ``"5GB"``, ``"500MB"``, ``"2GiB"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(value), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise CheckpointError(f"shard size must be a positive number of bytes or a size like '5GB', got {value!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_weights(tensors: dict[str, torch.Tensor], directory: Path, shard_size=DEFAULT_SHARD_SIZE,
                  save=None) -> list[str]:
    """Write ``tensors`` under ``directory``; the names of the files written (shards and index)."""
    save = save or save_file
    limit = parse_size(shard_size)
    shards, current, size = [], {}, 0
    for key, t in tensors.items():
        if current and size + nbytes(t) > limit:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += nbytes(t)
    shards.append(current)
    if len(shards) == 1:
        save(shards[0], directory / WEIGHTS, metadata={"format": "pt"})
        return [WEIGHTS]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save(shard, directory / name, metadata={"format": "pt"})
        names.append(name)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(nbytes(t) for t in tensors.values())}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX]


def weight_files(directory: Path) -> list[str]:
    """The safetensors files holding a directory's weights: its index's shards, or ``model.safetensors``."""
    directory = Path(directory)
    if (directory / INDEX).is_file():
        try:
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{directory / INDEX} is not a safetensors index: {exc}") from None
        for name in names:
            if not isinstance(name, str) or "/" in name or "\\" in name or not name.endswith(".safetensors"):
                raise CheckpointError(f"{directory / INDEX}: shard {name!r} must be a .safetensors file beside it")
        return names
    return [WEIGHTS]


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's weight files (sharded or not)."""
    out = {}
    for name in weight_files(directory):
        try:
            out.update(load_file(Path(directory) / name))
        except Exception as exc:
            raise CheckpointError(f"{directory}/{name} cannot be read: {exc}") from None
    return out


def weights_header(directory: Path) -> dict[str, tuple]:
    """``{name: shape}`` of every tensor, from the safetensors headers alone."""
    from safetensors import safe_open

    out = {}
    for name in weight_files(directory):
        try:
            with safe_open(Path(directory) / name, "pt") as f:
                out.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except Exception as exc:
            raise CheckpointError(f"{directory}/{name} cannot be read: {exc}") from None
    return out
