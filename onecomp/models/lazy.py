"""Models whose weights stay on disk until needed: the skeleton on the meta device, tensors read one
module at a time from the model's safetensors files (one file, or shards listed in an index).

The streamed layer-wise stage (``model.stream``) loads the embeddings, final norm and head up front,
one decoder block at a time while it is calibrated and quantized, and releases each block when it is
saved: what is resident does not grow with the model's depth.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class WeightFiles:
    """The tensors of an HF model directory by name, read lazily (memory-mapped, one tensor at a time).

    No file stays open: a tensor read from a memory-mapped file keeps the pages it touched (and any it
    wrote) resident as long as the mapping lives, so each read maps the file only for that read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if (self.path / INDEX).exists():
            weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
        elif (self.path / SINGLE).exists():
            weight_map = None
        else:
            raise ModelLoadError(f"{self.path} has neither {SINGLE} nor {INDEX}: streaming reads safetensors only")
        if weight_map is None:
            from safetensors import safe_open

            with safe_open(str(self.path / SINGLE), framework="pt") as f:
                self.file_of = {name: SINGLE for name in f.keys()}
        else:
            self.file_of = dict(weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def get(self, name: str) -> torch.Tensor:
        return self.read([name])[name]

    def read(self, names) -> dict[str, torch.Tensor]:
        """The tensors ``names``, each file opened once."""
        from safetensors import safe_open

        missing = [n for n in names if n not in self.file_of]
        if missing:
            raise ModelLoadError(f"{self.path}: tensor {missing[0]} is in no safetensors file")
        out = {}
        for file in dict.fromkeys(self.file_of[n] for n in names):
            with safe_open(str(self.path / file), framework="pt") as f:
                out.update({n: f.get_tensor(n) for n in names if self.file_of[n] == file})
        return out


def meta_model(path: str | Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model of the HF directory ``path`` with every parameter on the meta device (nothing read).

    Buffers the files do not hold (rotary frequencies) are computed for real: modules holding such
    buffers are rebuilt on the CPU from the config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..components import replace_module

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)) and not any(True for _ in module.parameters()):
            try:
                fresh = type(module)(module.config if hasattr(module, "config") else config)
            except Exception as exc:
                raise ModelLoadError(f"streaming cannot build {name} ({type(module).__name__}) of this "
                                     f"architecture outside the meta device: {exc}; set model.stream = false") from None
            replace_module(model, name, fresh)
    model.eval()
    model.config.use_cache = False
    return model


@torch.no_grad()
def load_params_(model: nn.Module, prefix: str, files: WeightFiles, device, dtype: torch.dtype) -> None:
    """Read the parameters of ``model.<prefix>`` from ``files`` into it (on ``device``, in ``dtype``).

    A parameter that is not in the files keeps what it has when it is real (tied weights) and is an
    error when it is still on the meta device."""
    module = model.get_submodule(prefix) if prefix else model
    params = list(module.named_parameters(remove_duplicate=False))
    tensors = files.read([f"{prefix}.{n}" if prefix else n for n, _ in params
                          if (f"{prefix}.{n}" if prefix else n) in files])
    for name, p in params:
        full = f"{prefix}.{name}" if prefix else name
        owner, _, leaf = name.rpartition(".")
        holder = module.get_submodule(owner) if owner else module
        if full in tensors:
            t = tensors.pop(full).to(device=device, dtype=dtype if p.dtype.is_floating_point else p.dtype)
            holder._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        elif p.is_meta:
            raise ModelLoadError(f"{files.path}: parameter {full} is in no safetensors file")


def release_(module: nn.Module) -> None:
    """Put every parameter and buffer of ``module`` back on the meta device: their memory is freed."""
    for m in module.modules():
        for store in (m._parameters, m._buffers):
            for k, v in list(store.items()):
                if v is not None and not v.is_meta:
                    meta = torch.empty_like(v, device="meta")
                    store[k] = nn.Parameter(meta, requires_grad=False) if isinstance(v, nn.Parameter) else meta
        if hasattr(m, "_cache"):
            m._cache = None


def load_streamed(path: str | Path, dtype: torch.dtype, device,
                  trust_remote_code: bool = False) -> tuple[nn.Module, WeightFiles]:
    """The model with everything but its decoder blocks read from ``path`` (embeddings, final norm,
    head; a tied head shares the embedding), and the files to read the blocks from as they are needed."""

    files = WeightFiles(path)
    model = meta_model(path, dtype, trust_remote_code)
    load_outside_blocks_(model, files, device, dtype)
    return model, files


def _block_prefixes(model: nn.Module) -> tuple[str, ...]:
    from .structure import find_blocks

    blocks_path, block_list = find_blocks(model)
    return tuple(f"{blocks_path}.{i}." for i in range(len(block_list)))


def load_outside_blocks_(model: nn.Module, files: WeightFiles, device, dtype: torch.dtype) -> None:
    """Read every parameter outside the decoder blocks (embeddings, final norm, head) from ``files``; a
    tied head shares the embedding again."""
    blocks = _block_prefixes(model)
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        if name.startswith(blocks):
            continue
        owner, _, leaf = name.rpartition(".")
        if name in files:
            holder = model.get_submodule(owner)
            t = files.get(name).to(device=device, dtype=dtype)
            holder._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(blocks)]
    if left:
        raise ModelLoadError(f"{files.path}: no tensor in its safetensors files for {', '.join(left[:5])}")


def release_outside_blocks_(model: nn.Module) -> None:
    """Put the parameters outside the decoder blocks (embeddings, head: often the largest tensors) on the meta
    device while only the blocks run; ``load_outside_blocks_`` reads them back. Buffers stay."""
    blocks = _block_prefixes(model)
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        if not name.startswith(blocks) and not p.is_meta:
            owner, _, leaf = name.rpartition(".")
            holder = model.get_submodule(owner) if owner else model
            holder._parameters[leaf] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def local_dir(source: str) -> Path:
    """The HF directory ``source`` is read from; a GGUF file (the embedded model) is converted once first."""
    from .load import EMBEDDED_MODELS, embedded_path, gguf_cache_dir, load_model

    if source in EMBEDDED_MODELS or source.endswith(".gguf"):
        path = embedded_path(source) if source in EMBEDDED_MODELS else Path(source).expanduser()
        cached = gguf_cache_dir(path)
        if not (cached / SINGLE).exists():
            load_model(source)  # converts and caches
        return cached
    path = Path(source).expanduser()
    if not (path / "config.json").exists():
        raise ModelLoadError(f"model.stream reads a local HF directory or a .gguf file; {source!r} is neither")
    return path


def open_streamed(source: str, dtype: str, device, trust_remote_code: bool = False):
    """``(LoadedModel, WeightFiles)``: ``source``'s model with its decoder blocks left on disk."""
    from transformers import AutoTokenizer

    from .load import DTYPES, LoadedModel

    path = local_dir(source)
    model, files = load_streamed(path, DTYPES[dtype], device, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return LoadedModel(model, tokenizer, source, str(path)), files


def inspect_streamed(model: nn.Module, files: WeightFiles, device):
    """``inspect_model`` for a model whose blocks are on disk: block 0 is read and inspected alone (the
    model run with a one-block list), and every other block must have its linear layers."""
    from .structure import BlockInfo, find_blocks, inspect_model, is_linear

    path, blocks = find_blocks(model)
    parent, _, attr = path.rpartition(".")
    holder = model.get_submodule(parent) if parent else model
    load_params_(model, f"{path}.0", files, device, next(p.dtype for p in model.parameters() if not p.is_meta))
    setattr(holder, attr, nn.ModuleList([blocks[0]]))
    try:
        one = inspect_model(model)
    finally:
        setattr(holder, attr, blocks)
        release_(blocks[0])

    def shapes(block):
        return {rel: (m.out_features, m.in_features) for rel, m in block.named_modules() if is_linear(m)}

    info = one.blocks[0]
    for i, block in enumerate(blocks):
        if shapes(block) != shapes(blocks[0]):
            raise ModelLoadError(f"model.stream needs decoder blocks of one structure; block {i} differs from block 0")
    one.blocks = [BlockInfo(i, f"{path}.{i}", dict(info.linears), [list(g) for g in info.groups])
                  for i in range(len(blocks))]
    one.n_params = sum(p.numel() for p in model.parameters())
    return one


def streamed_teacher(path: str | Path, dtype: str, device, trust_remote_code: bool = False) -> nn.Module:
    """The fp model of ``path`` whose decoder blocks read their weights from the files each time they run
    and release them afterwards: a teacher for block- and model-scope refiners that is never whole in memory."""
    from .load import DTYPES
    from .structure import find_blocks

    model, files = load_streamed(path, DTYPES[dtype], device, trust_remote_code)
    blocks_path, blocks = find_blocks(model)

    def fetch(i):
        def hook(module, args):
            load_params_(model, f"{blocks_path}.{i}", files, device, DTYPES[dtype])
        return hook

    def drop(module, args, output):
        release_(module)

    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(fetch(i))
        block.register_forward_hook(drop)
    return model
