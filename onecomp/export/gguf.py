"""GGUF files for llama.cpp (Llama-architecture models), written through the ``gguf`` package.

A 4-bit integer module with groups of a multiple of 32 columns becomes ``Q4_1`` blocks of 32:
``Ŵ = s·(q − z) = d·q + m`` with ``d = s`` and ``m = −s·z`` (``m`` rounded to fp16, the only loss).
Other integer modules and dense ones are written F16, norms F32, embeddings and the output
F16. ``attn_q``/``attn_k`` rows are permuted as llama.cpp's converter does (whole rows, so
blocks stay intact). The tokenizer's keys are copied from the GGUF the model came from when
there is one (the embedded model), else built from ``tokenizer.json`` (byte-level BPE).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .affine import AffineInt
from .common import ExportError, split

TARGET = "gguf"
ACCEPTS = "4-bit integer groups of a multiple of 32 columns as Q4_1 (other integer widths as F16), without act-order"
BLOCK = 32


def q4_1_blocks(a: AffineInt) -> np.ndarray:
    """``[out, in/32 · 20]`` bytes: per block fp16 ``d``, fp16 ``m``, then 16 bytes of nibbles
    (byte ``j`` holds element ``j`` low and element ``j + 16`` high)."""
    out, inp = a.shape
    g_idx = a.static_g_idx()[::BLOCK]  # the group of each block
    d = a.scales.to(torch.float16)[:, g_idx]  # [out, nb]
    m = (-(a.scales.float() * a.zeros.float()))[:, g_idx].to(torch.float16)
    q = a.q.to(torch.uint8).view(out, -1, BLOCK)
    nibbles = q[:, :, :16] | (q[:, :, 16:] << 4)  # [out, nb, 16]
    dm = torch.stack([d, m], -1).contiguous().view(torch.uint8).view(out, -1, 4)
    return torch.cat([dm, nibbles], -1).reshape(out, -1).numpy()


def q4_1_ok(a: AffineInt) -> bool:
    return a.bits == 4 and a.shape[1] % BLOCK == 0 and a.group_size % BLOCK == 0


def permute(W: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for attn_q / attn_k (rotary halves interleaved per head)."""
    return W.reshape(n_head, 2, W.shape[0] // n_head // 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def _permute_affine(a: AffineInt, n_head: int) -> AffineInt:
    return AffineInt(a.bits, a.group_size, permute(a.q, n_head), permute(a.zeros, n_head), permute(a.scales, n_head),
                     a.g_idx)


def write_gguf(model, checkpoint: Path, out: Path, registry, *, force: bool = False) -> Path:
    import gguf

    cfg = model.config
    if cfg.model_type != "llama":
        raise ExportError(f"--to gguf writes Llama-architecture models; this one is {cfg.model_type!r}")
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass --force to replace it")
    affine, plain = split(model, TARGET, ACCEPTS, registry)
    for name, a in affine.items():
        if not a.has_static_groups():
            raise ExportError(f"module {name} was quantized with act-order (g_idx), which GGUF blocks cannot "
                              "express; re-run with act_order = false, or export --to gptq")
    n_blocks = cfg.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), "llama")
    _write_hparams(writer, cfg, affine)
    _write_tokenizer(writer, checkpoint)
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    tied = getattr(cfg, "tie_word_embeddings", False)
    for key in sorted({*plain, *(n + ".weight" for n in affine)}):
        if tied and key == "lm_head.weight":
            continue
        gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ExportError(f"tensor {key} has no GGUF name for the llama architecture")
        module = key.rsplit(".", 1)[0]
        n_head = heads.get(module.rsplit(".", 1)[-1])
        if module in affine and q4_1_ok(affine[module]):
            a = _permute_affine(affine[module], n_head) if n_head else affine[module]
            writer.add_tensor(gname, q4_1_blocks(a), raw_dtype=gguf.GGMLQuantizationType.Q4_1)
            continue
        W = affine[module].dequantize() if module in affine else plain[key].float()
        if n_head:
            W = permute(W, n_head)
        dtype = np.float32 if W.ndim == 1 else np.float16
        writer.add_tensor(gname, W.numpy().astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _write_hparams(writer, cfg, affine) -> None:
    import gguf

    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    q4 = affine and all(q4_1_ok(a) for a in affine.values())
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1 if q4 else gguf.LlamaFileType.MOSTLY_F16)


def _source_gguf(checkpoint: Path) -> Path | None:
    """The GGUF file the checkpoint's base model was read from, if any (the embedded model)."""
    try:
        base = json.loads((checkpoint / "onecomp.json").read_text()).get("base_model", "")
    except (OSError, ValueError):
        return None
    from ..models.load import EMBEDDED_MODELS, embedded_path

    if base in EMBEDDED_MODELS:
        return embedded_path(base)
    return Path(base) if str(base).endswith(".gguf") and Path(base).is_file() else None


def _write_tokenizer(writer, checkpoint: Path) -> None:
    import gguf

    source = _source_gguf(checkpoint)
    if source is not None:
        reader = gguf.GGUFReader(str(source))
        for field in reader.fields.values():
            if field.name.startswith("tokenizer."):
                _copy_field(writer, field)
        return
    tj = checkpoint / "tokenizer.json"
    if not tj.exists():
        return  # a file without a tokenizer still loads in gguf's reader; llama.cpp needs one
    tok = json.loads(tj.read_text())
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"{tj}: only byte-level BPE tokenizers are written to GGUF, got {model.get('type')!r}")
    vocab = dict(model["vocab"])
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    for i, t in added.items():
        vocab.setdefault(t["content"], i)
    tokens = [None] * (max(vocab.values()) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    types = [gguf.TokenType.CONTROL if i in added and added[i].get("special") else gguf.TokenType.NORMAL
             for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)])
    writer.add_token_types(types)
    writer.add_token_merges(merges)


def _copy_field(writer, field) -> None:
    """One key/value of a GGUFReader field, written again with its own type."""
    import gguf

    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        sub = field.types[1]
        if sub == gguf.GGUFValueType.STRING:
            value = [bytes(field.parts[i]).decode("utf-8", errors="surrogateescape") for i in field.data]
        else:
            value = [field.parts[i].tolist()[0] for i in field.data]
        writer.add_array(field.name, value)
    elif kind == gguf.GGUFValueType.STRING:
        writer.add_string(field.name, bytes(field.parts[field.data[0]]).decode("utf-8"))
    else:
        writer.add_key_value(field.name, field.parts[field.data[0]].tolist()[0], kind)
