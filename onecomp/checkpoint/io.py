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
import stat
import time
from pathlib import Path, PurePosixPath

import torch
from safetensors.torch import save_file
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
                    base_model: str, config: dict, stages: list, shard_size=None) -> dict:
    """Write ``model`` to ``path`` atomically and return the manifest. Weights larger than
    ``shard_size`` (default: the config's ``output.shard_size``, else 5 GB) are sharded."""
    from .._version import __version__

    path = Path(path)
    check_finite(model)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        modules = module_entries(model, registry)
        _write_hf_side(model, tmp, modules, registry, config, shard_size)
        files = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "schema": SCHEMA,
            "onecomp_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "base_model": base_model,
            "config": config,
            "modules": modules,
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


def _write_hf_side(model: nn.Module, directory: Path, modules: dict, registry, config: dict, shard_size) -> None:
    """The weights (sharded past the shard size) and ``config.json``'s ``quantization_config``."""
    from .hf_config import quantization_config
    from .shards import DEFAULT_SHARD_SIZE, write_weights

    if shard_size is None:
        shard_size = ((config or {}).get("output") or {}).get("shard_size") or DEFAULT_SHARD_SIZE
    write_weights(tensors_to_save(model), directory, shard_size, save=save_file)
    cfg = json.loads((directory / "config.json").read_text())
    cfg["quantization_config"] = quantization_config(modules, registry)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


#: the largest manifest read: a manifest lists files and modules, never tensors
MAX_MANIFEST_BYTES = 64 << 20
#: files a checkpoint may hold without listing them: documentation the loader never reads
UNLISTED_OK = ("README.md", "LICENSE", "LICENSE.txt", ".gitattributes")
#: suffixes of files that hold code or pickles; never accepted unlisted
CODE_SUFFIXES = (".py", ".pyc", ".so", ".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt")


def _inside(root: Path, name: str) -> tuple[Path, str]:
    """``(root/name, state)``: state is ``"file"`` for a regular file inside ``root`` (after symlinks),
    ``"missing"`` when nothing is there, else ``"refused"`` (outside, a directory, a device, a FIFO).

    Only ``lstat``/``stat`` are used, never ``open``: a FIFO or device is refused without blocking, and
    whether a path outside ``root`` exists is never looked at."""
    p = root / name
    real, top = os.path.realpath(p), os.path.realpath(root)
    if os.path.commonpath([real, top]) != top:
        return p, "refused"
    try:
        return p, "file" if stat.S_ISREG(os.stat(real).st_mode) else "refused"
    except FileNotFoundError:
        return p, "missing"
    except OSError:
        return p, "refused"


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    mf = path / MANIFEST
    if not os.path.lexists(mf):
        raise CheckpointError(f"{path} is not a onecomp checkpoint: {MANIFEST} is missing")
    if _inside(path, MANIFEST)[1] != "file" or mf.stat().st_size > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{mf}: must be a regular JSON file inside the checkpoint directory, "
                              f"at most {MAX_MANIFEST_BYTES >> 20} MiB")
    try:
        manifest = json.loads(mf.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{mf} is corrupted: {exc}") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{mf}: must be a JSON object, got {type(manifest).__name__}")
    return manifest


def _bad(path: Path, where: str, what: str):
    return CheckpointError(f"{path / MANIFEST}: {where}: {what}")


def _validate_manifest(path: Path, manifest: dict) -> None:
    """Every field the loader uses has its JSON type, before anything else is read."""
    schema = manifest.get("schema")
    if schema != SCHEMA:
        raise _bad(path, "schema", f"must be {SCHEMA}, got {schema!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise _bad(path, "files", "must be a table of file name -> sha256 (a checkpoint lists every file it ships)")
    for name, digest in files.items():
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise _bad(path, f"files[{name!r}]", "must be a sha256 as 64 lowercase hex digits")
    modules = manifest.get("modules")
    if not isinstance(modules, dict):
        raise _bad(path, "modules", "must be a table of module name -> format entry")
    for name, entry in modules.items():
        where = f"modules[{name!r}]"
        if not name or not isinstance(entry, dict):
            raise _bad(path, where, "must be a table with format, version, params and shape")
        if not isinstance(entry.get("format"), str):
            raise _bad(path, f"{where}.format", "must be a format name (a string)")
        version = entry.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise _bad(path, f"{where}.version", f"must be a positive integer, got {version!r}")
        if not isinstance(entry.get("params"), dict):
            raise _bad(path, f"{where}.params", "must be a table of format parameters")
        shape = entry.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and
                all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 2**31 for d in shape)):
            raise _bad(path, f"{where}.shape", f"must be [out, in] with positive integers, got {shape!r}")
        for key in ("dist",):
            if key in entry and not isinstance(entry[key], str):
                raise _bad(path, f"{where}.{key}", "must be a string")


def _safe_files(path: Path, manifest: dict) -> dict[str, Path]:
    """The manifest's files as paths inside ``path``, refusing anything else before opening it.

    A name must be a relative path without ``..`` naming a regular file inside the directory
    (symlinks leaving it, devices and FIFOs are refused with one message that does not say whether
    an outside file exists); ``config.json`` must be listed, and every file the directory holds must
    be listed too, except documentation (``UNLISTED_OK``, ``*.md``) that is never read."""
    out = {}
    for name in manifest["files"]:
        unsafe = (not name or "\\" in name or "\0" in name or PurePosixPath(name).is_absolute() or
                  any(part in ("..", ".", "") for part in name.split("/")))
        found, state = (None, "refused") if unsafe else _inside(path, name)
        if state == "missing":
            raise CheckpointError(f"{path}: file {name} listed in {MANIFEST} is missing")
        if state != "file":
            raise _bad(path, f"files[{name!r}]", "must name a regular file inside the checkpoint directory "
                                                 "(no absolute path, '..', symlink leaving it, or special file)")
        out[name] = found
    if "config.json" not in out:
        raise _bad(path, "files", "must list config.json (every file the loader reads is listed and hashed)")
    unlisted = []
    for root, dirs, names in os.walk(path):  # os.walk does not follow symlinked directories
        rel = Path(root).relative_to(path)
        if rel == Path("."):
            dirs[:] = [d for d in dirs if d != ".cache"]  # huggingface_hub's download metadata, never read
        for n in names + [d for d in dirs if os.path.islink(Path(root) / d)]:
            name = (rel / n).as_posix()
            if name in out or name == MANIFEST:
                continue
            if n.endswith(CODE_SUFFIXES) or not (n in UNLISTED_OK or n.endswith(".md")):
                unlisted.append(name)
    if unlisted:
        raise CheckpointError(f"{path}: holds files not listed in {MANIFEST}: {', '.join(sorted(unlisted)[:5])}; "
                              "a checkpoint lists (and hashes) every file it ships — remove them or re-download")
    return out


def check_finite(model_or_tensors, where: str = "") -> None:
    """Raise CheckpointError naming the module when any floating tensor holds NaN or ±Inf."""
    tensors = model_or_tensors if isinstance(model_or_tensors, dict) else tensors_to_save(model_or_tensors)
    for key, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            module, _, field = key.rpartition(".")
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{where}{module or key}: tensor {field!r} holds {bad} non-finite values "
                                  "(NaN or Inf); refusing to write or load it")


def verify(path: str | os.PathLike, manifest: dict | None = None) -> None:
    """Raise CheckpointError unless the manifest is well formed, every file is listed, safe, and has
    its recorded sha256."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    _validate_manifest(path, manifest)
    for name, f in _safe_files(path, manifest).items():
        if sha256(f) != manifest["files"][name]:
            raise CheckpointError(f"{path}: file {name} is corrupted (sha256 differs from {MANIFEST})")


def _weights_header(path: Path) -> dict[str, tuple]:
    """``{name: shape}`` of the weight files (one or shards) from their headers alone (nothing is allocated)."""
    from .shards import weights_header

    return weights_header(path)


def _check_sizes(path: Path, config, manifest: dict, header: dict) -> None:
    """The model ``config.json`` describes must be the one the files hold: built on the meta device
    (no memory), its tensors are compared with the weight file's header before anything is allocated."""
    from transformers import AutoModelForCausalLM

    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > len(header):
        raise CheckpointError(f"{path}/config.json: num_hidden_layers {layers} is more than {WEIGHTS} holds "
                              f"tensors ({len(header)})")
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as exc:
        raise CheckpointError(f"{path}/config.json: cannot build its model: {exc}") from None
    placed = tuple(name + "." for name in manifest["modules"])
    for name, entry in manifest["modules"].items():
        try:
            linear = skeleton.get_submodule(name)
        except AttributeError:
            raise _bad(path, f"modules[{name!r}]", "is not a module of the model config.json describes") from None
        if not isinstance(linear, nn.Linear) or [linear.out_features, linear.in_features] != entry["shape"]:
            raise _bad(path, f"modules[{name!r}].shape", f"{entry['shape']} is not the shape of a linear layer "
                                                          "of the model config.json describes")
    tied = set(getattr(skeleton, "_tied_weights_keys", None) or []) if getattr(config, "tie_word_embeddings",
                                                                                False) else set()
    for key, t in skeleton.state_dict().items():
        if key.startswith(placed) or key in tied and key not in header:
            continue
        if key not in header or header[key] != tuple(t.shape):
            raise CheckpointError(f"{path}/config.json declares tensor {key} {tuple(t.shape)}, but {WEIGHTS} "
                                  f"holds {header.get(key, 'no such tensor')}")


def _check_weights_listed(path: Path, files: dict) -> None:
    """Every weight file (``model.safetensors``, or the index and each shard it names) is in the manifest."""
    from .shards import INDEX, weight_files

    needed = weight_files(path) + ([INDEX] if (path / INDEX).is_file() else [])
    for name in needed:
        if name not in files:
            raise _bad(path, "files", f"must list {name}")


def _read_weights(path: Path) -> dict:
    from .shards import read_weights

    return read_weights(path)


def foreign_reader(path: Path):
    """``read(path, dtype)`` for a directory another tool wrote (no manifest) in a layout we import:
    compressed-tensors ``pack-quantized`` or the classic GPTQ layout; None for anything else."""
    from ..export.gptq_import import is_gptq, load_gptq
    from ..export.pack_quantized import is_pack_quantized, load_pack_quantized

    path = Path(path)
    if os.path.lexists(path / MANIFEST):
        return None
    if is_pack_quantized(path):
        return load_pack_quantized
    return load_gptq if is_gptq(path) else None


def _load_foreign(path: Path, dtype) -> nn.Module | None:
    """A directory another tool wrote, dequantized for evaluation (see ``foreign_reader``); None for anything else."""
    reader = foreign_reader(path)
    if reader is None:
        return None
    model = reader(path, dtype or torch.float32)
    model.config.use_cache = False
    return model


def load(path: str | os.PathLike, registry=None, *, check_hashes: bool = True, dtype=None,
         adapters=None, backend=None, cache_dequantized: bool = True) -> nn.Module:
    """A transformers model with QuantLinear modules rebuilt from a onecomp checkpoint; ``adapters``
    (adapter directories) are attached unmerged, by default those the checkpoint carries.
    ``backend`` (``"auto"``, a name or a list, see ``onecomp.kernels``) picks each module's kernel;
    None runs the reference path, keeping dequantized weights when ``cache_dequantized``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..kernels import resolve_backends, select_kernels
    from ..registry import Registry

    registry = registry or Registry.default()
    backends = resolve_backends(backend, registry)  # first: an unknown name fails before the weights are read
    path = Path(path)
    foreign = _load_foreign(path, dtype)
    if foreign is not None:
        return foreign
    manifest = read_manifest(path)
    _validate_manifest(path, manifest)
    files = _safe_files(path, manifest)
    if check_hashes:
        verify(path, manifest)
    _check_weights_listed(path, files)
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
        try:
            formats[name] = cls.from_dict(entry["params"])
        except Exception as exc:
            raise _bad(path, f"modules[{name!r}].params", str(exc)) from None
    header = _weights_header(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:
        raise CheckpointError(f"{path}/config.json cannot be used: {exc}") from None
    _check_sizes(path, config, manifest, header)
    tensors = _read_weights(path)
    check_finite(tensors, f"{path}: ")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or getattr(config, "dtype", None) or torch.float32,
                                             trust_remote_code=False)
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
    select_kernels(model, backends, cache_dequantized=cache_dequantized)
    from .adapters import attach_adapters

    return attach_adapters(model, path, adapters, registry, check_hashes=check_hashes)
