"""Interop: checkpoints plain transformers never loads as random weights, exports to
compressed-tensors and the classic GPTQ layout, import of pack-quantized, sharded weights."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import onecomp
from onecomp import Registry
from onecomp.checkpoint import save_checkpoint
from onecomp.export import ExportError, export, pack_rows
from onecomp.testing.models import make_tiny_llama

#: logits of the exported model against the checkpoint's weights, dequantized by their format, in
#: plain nn.Linear modules (both fp32, the same numbers: only summation order may differ)
ATOL = 1e-5
#: against onecomp.load itself, whose kernels may compute in another precision or order
ATOL_LOAD = 1e-2


def _checkpoint(path, quantizer, registry, **kw):
    model = make_tiny_llama(seed=0)
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    onecomp.compress(model, config={"plan": {"quantizer": quantizer}}, windows=windows, registry=registry)
    save_checkpoint(model, None, path, registry, base_model="tiny", config={}, stages=[], **kw)
    return path


@pytest.fixture(scope="module")
def reg():
    return Registry.default()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def asym(tmp_path_factory, reg):
    return _checkpoint(tmp_path_factory.mktemp("asym") / "ckpt", {"name": "rtn", "bits": 4, "group_size": 32}, reg)


@pytest.fixture(scope="module")
def sym(tmp_path_factory, reg):
    return _checkpoint(tmp_path_factory.mktemp("sym") / "ckpt",
                       {"name": "rtn", "bits": 4, "group_size": 32, "sym": True}, reg)


def _reference(path, ids):
    """Logits of ``onecomp.load(path)`` with each QuantLinear's dequantized weight in an nn.Linear;
    checked against onecomp.load's own logits within ATOL_LOAD."""
    from onecomp.checkpoint import quantized_modules

    model = onecomp.load(path)
    with torch.no_grad():
        loaded = model(ids).logits
        for name, q in quantized_modules(model).items():
            linear = torch.nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
            linear.weight.data = q.dequantize()
            if q.bias is not None:
                linear.bias.data = q.bias.data
            onecomp.replace_module(model, name, linear)
        logits = model(ids).logits
    torch.testing.assert_close(loaded, logits, atol=ATOL_LOAD, rtol=0)
    return logits


def _plain_transformers(paths, ids, tmp):
    """transformers' from_pretrained on each path, in one subprocess where onecomp cannot be imported:
    path -> logits, or the last line of the error it raised."""
    torch.save(ids, tmp / "ids.pt")
    code = textwrap.dedent(f"""
        import json, sys, traceback
        sys.modules["onecomp"] = None  # any import of onecomp raises ImportError
        import torch
        from transformers import AutoModelForCausalLM
        results = {{}}
        for i, path in enumerate({[str(p) for p in paths]!r}):
            try:
                model = AutoModelForCausalLM.from_pretrained(path)
                with torch.no_grad():
                    torch.save(model(torch.load({str(tmp / "ids.pt")!r})).logits, {str(tmp)!r} + f"/logits{{i}}.pt")
                results[path] = None
            except Exception:
                results[path] = traceback.format_exc().strip().splitlines()[-1]
        print(json.dumps(results))
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    results = json.loads(p.stdout.strip().splitlines()[-1])
    return {Path(k): v if v is not None else torch.load(tmp / f"logits{i}.pt") for i, (k, v) in enumerate(results.items())}


# ---------------------------------------------------------------- no silent load


def test_every_checkpoint_carries_a_quantization_config(asym):
    qc = json.loads((asym / "config.json").read_text())["quantization_config"]
    assert qc["onecomp"]["formats"] == ["gptq"] and qc["onecomp"]["loader"] == "onecomp.load"


def test_plain_transformers_fails_loudly_on_packed_formats_and_reads_dense(asym, tmp_path, ids, reg):
    from onecomp.builtin.dense import Dense
    from onecomp.checkpoint import QuantLinear
    from onecomp.models import inspect_model

    mdbf = _checkpoint(tmp_path / "mdbf", {"name": "mdbf", "iterations": 1, "target_bpw": 4.0}, reg)
    model = make_tiny_llama(seed=0)
    fmt = Dense.from_dict({"dtype": "float32"})
    for name in inspect_model(model).linear_names():
        W = model.get_submodule(name).weight.detach()
        onecomp.replace_module(model, name, QuantLinear(fmt, tuple(W.shape), fmt.pack({"weight": W}, W.shape)))
    dense = tmp_path / "dense"
    save_checkpoint(model, None, dense, reg, base_model="tiny", config={}, stages=[])

    got = _plain_transformers([asym, mdbf, dense], ids, tmp_path)
    for path in (asym, mdbf):
        last = got[path]
        assert isinstance(last, str), f"transformers loaded {path} without an error"
        assert "OneComp checkpoint" in last and "onecomp.load(path)" in last, last
        assert ("onecomp export" in last) == (path == asym)  # mdbf has no runtime to export to
    torch.testing.assert_close(got[dense], _reference(dense, ids), atol=ATOL, rtol=0)


# ---------------------------------------------------------------- compressed-tensors


def test_our_packing_is_compressed_tensors_pack_to_int32():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(0)
    for bits in range(1, 9):
        q = torch.randint(0, 2**bits, (5, 77), generator=g)
        ours = pack_rows(q, bits)
        theirs = helpers.pack_to_int32((q - (1 << (bits - 1))).to(torch.int8), bits)
        assert torch.equal(ours, theirs), bits
        theirs0 = helpers.pack_to_int32((q.T - (1 << (bits - 1))).to(torch.int8).contiguous(), bits, packed_dim=0)
        assert torch.equal(pack_rows(q, bits).T, theirs0), bits


def test_compressed_tensors_export_loads_in_plain_transformers(sym, tmp_path, ids):
    pytest.importorskip("compressed_tensors")
    out = export(sym, "compressed-tensors", tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quantization_status"] == "compressed"
    (weights,) = qc["config_groups"].values()
    assert weights["weights"]["symmetric"] and weights["weights"]["group_size"] == 32
    logits = _plain_transformers([out], ids, tmp_path)[out]
    assert not isinstance(logits, str), logits
    torch.testing.assert_close(logits, _reference(sym, ids), atol=ATOL, rtol=0)


def test_asymmetric_export_decompresses_exactly_with_compressed_tensors(asym, tmp_path, ids):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    out = export(asym, "compressed-tensors", tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
    tensors = load_file(out / "model.safetensors")
    model = onecomp.load(asym)
    reference = _reference(asym, ids)
    name = "model.layers.1.mlp.down_proj"
    stored = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
    assert set(stored) == {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}
    W = PackedQuantizationCompressor.decompress(stored, scheme)["weight"]
    torch.testing.assert_close(W.float(), model.get_submodule(name).dequantize(), atol=0, rtol=0)
    # and onecomp reads it back as another tool's checkpoint
    with torch.no_grad():
        torch.testing.assert_close(onecomp.load(out)(ids).logits, reference, atol=ATOL, rtol=0)
    # transformers 5.x refuses asymmetric pack-quantized files: loudly, never silently
    got = _plain_transformers([out], ids, tmp_path)[out]
    assert isinstance(got, str) or torch.allclose(got, reference, atol=ATOL)


def test_act_order_and_unreadable_formats_are_refused(tmp_path, reg):
    gptq = _checkpoint(tmp_path / "gptq", {"name": "gptq", "bits": 4, "group_size": 32, "act_order": True,
                                           "mse": False}, reg)
    with pytest.raises(ExportError, match="act-order.*g_idx.*--to gptq"):
        export(gptq, "compressed-tensors", tmp_path / "ct")
    mdbf = _checkpoint(tmp_path / "mdbf", {"name": "mdbf", "iterations": 1, "target_bpw": 4.0}, reg)
    for target in ("compressed-tensors", "gptq"):
        with pytest.raises(ExportError, match=r"format 'mdbf', which no runtime .* accepts .*formats gptq"):
            export(mdbf, target, tmp_path / target)


# ---------------------------------------------------------------- classic GPTQ layout


def _unpack_classic(qweight, qzeros, scales, g_idx, bits):
    """An independent reading of AutoGPTQ's layout: 32/bits codes per int32 (2, 4, 8 bits), zeros minus one."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits)
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    q = ((words[:, None, :] >> shifts[None, :, None]) & (2**bits - 1)).reshape(-1, qweight.shape[1])  # [in, out]
    zw = qzeros.to(torch.int64) & 0xFFFFFFFF
    z = ((zw[:, :, None] >> shifts[None, None, :]) & (2**bits - 1)).reshape(qzeros.shape[0], -1)  # [G, out]
    z = (z + 1) & (2**bits - 1)
    assert q.shape[0] == qweight.shape[0] * per
    return (scales.float()[g_idx.long()] * (q - z[g_idx.long()]).float()).T  # [out, in]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gptq_export_matches_an_independent_unpacking(tmp_path, reg, bits):
    from safetensors.torch import load_file

    ckpt = _checkpoint(tmp_path / "c", {"name": "gptq", "bits": bits, "group_size": 32, "act_order": True,
                                        "mse": False}, reg)
    out = export(ckpt, "gptq", tmp_path / "gptq")
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc == {k: v for k, v in json.loads((out / "config.json").read_text())["quantization_config"].items()
                  if k != "quant_method"}
    assert qc["bits"] == bits and qc["group_size"] == 32 and qc["desc_act"] and qc["checkpoint_format"] == "gptq"
    tensors = load_file(out / "model.safetensors")
    model = onecomp.load(ckpt)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        t = {k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        out_f, in_f = model.get_submodule(name).shape
        assert t["qweight"].shape == (in_f * bits // 32, out_f) and t["qzeros"].shape == (in_f // 32, out_f * bits // 32)
        W = _unpack_classic(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
        torch.testing.assert_close(W, model.get_submodule(name).dequantize(), atol=0, rtol=0)


# ---------------------------------------------------------------- sharding and the command line


def test_sharded_checkpoint_round_trips(tmp_path, reg, ids):
    path = _checkpoint(tmp_path / "sharded", {"name": "rtn", "bits": 4, "group_size": 32}, reg, shard_size="40KB")
    by_config = tmp_path / "by-config"
    save_checkpoint(onecomp.load(path), None, by_config, reg, base_model="tiny",
                    config={"output": {"shard_size": "40KB"}}, stages=[])
    assert (by_config / "model.safetensors.index.json").exists()  # output.shard_size of the run's config
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (path / "model.safetensors").exists()
    from safetensors.torch import load_file

    for s in shards:  # each shard within the size, or a single tensor larger than it
        held = load_file(path / s)
        assert sum(t.numel() * t.element_size() for t in held.values()) <= 40_000 or len(held) == 1
    manifest = json.loads((path / "onecomp.json").read_text())
    assert set(shards) | {"model.safetensors.index.json"} <= set(manifest["files"])
    whole = _checkpoint(tmp_path / "whole", {"name": "rtn", "bits": 4, "group_size": 32}, reg)
    torch.testing.assert_close(_reference(path, ids), _reference(whole, ids), atol=0, rtol=0)
    out = export(path, "compressed-tensors", tmp_path / "ct", shard_size="40KB")
    assert (out / "model.safetensors.index.json").exists()
    with torch.no_grad():
        torch.testing.assert_close(onecomp.load(out)(ids).logits, _reference(whole, ids), atol=ATOL, rtol=0)


def test_export_on_the_command_line(sym, tmp_path, capsys):
    from onecomp.cli import main

    assert main(["export", str(sym), "--to", "gptq", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g" / "quantize_config.json").exists()
    assert main(["export", str(sym), "--to", "gptq", str(tmp_path / "g")]) == 2  # not empty, no --force
    assert "--force" in capsys.readouterr().err


# ---------------------------------------------------------------- GGUF


def test_gguf_export_reads_back_as_the_same_weights(asym, tmp_path, reg):
    gguf = pytest.importorskip("gguf")
    from onecomp.checkpoint import quantized_modules
    from onecomp.export.gguf import permute

    out = export(asym, "gguf", tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    model = onecomp.load(asym)
    cfg = model.config
    checked = 0
    for name, q in quantized_modules(model).items():
        layer, kind = int(name.split(".")[2]), name.rsplit(".", 1)[-1]
        gname = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[kind]
        t = tensors[f"blk.{layer}.{gname}.weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
        W = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
        want = q.dequantize()
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(kind)
        if heads:
            want = permute(want, heads)
        a = q.format.as_affine_int(q.stored(), q.shape)
        m_max = (a.scales.float() * a.zeros.float()).abs().max().item()
        # d = s exactly; m = −s·z rounded to fp16: at most half an fp16 ulp of |m|
        torch.testing.assert_close(W, want, atol=m_max * 2**-11, rtol=0)
        checked += 1
    assert checked == 14
    norm = torch.from_numpy(np.array(tensors["blk.0.attn_norm.weight"].data))
    torch.testing.assert_close(norm, model.model.layers[0].input_layernorm.weight.detach(), atol=0, rtol=0)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.block_count"].contents() == 2


def test_gguf_copies_the_tokenizer_of_the_source_gguf(tmp_path, reg):
    gguf = pytest.importorskip("gguf")
    from onecomp.models.load import embedded_path

    ckpt = _checkpoint(tmp_path / "c", {"name": "rtn", "bits": 4, "group_size": 32}, reg)
    manifest = json.loads((ckpt / "onecomp.json").read_text())
    manifest["base_model"] = "smollm2-135m"
    (ckpt / "onecomp.json").write_text(json.dumps(manifest))
    out = export(ckpt, "gguf", tmp_path / "m.gguf")
    ours, source = gguf.GGUFReader(str(out)).fields, gguf.GGUFReader(str(embedded_path("smollm2-135m"))).fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id"):
        assert ours[key].contents() == source[key].contents(), key


def test_gguf_export_loads_in_transformers_gguf_reader(asym, tmp_path, ids):
    """transformers reads GGUF independently (it un-permutes attn_q/attn_k): same logits up to the
    fp16 embeddings and the fp16 rounding of m."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    out = export(asym, "gguf", tmp_path / "g" / "m.gguf")
    model = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, _reference(asym, ids), atol=2e-3, rtol=0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_pack_quantized_directory_written_by_compressed_tensors_loads_and_evaluates(tmp_path, ids, symmetric,
                                                                                       capsys):
    """compressed-tensors' own compressor writes the tensors and its QuantizationConfig the block;
    onecomp.load and `onecomp eval` read them, giving the weights compressed-tensors decompresses."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from safetensors.torch import save_file

    from onecomp.cli import main
    from onecomp.models import inspect_model

    model = make_tiny_llama(seed=3)
    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": 32}
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    expected = {}
    for name in inspect_model(model).linear_names():
        W = state.pop(name + ".weight")
        Wg = W.view(W.shape[0], -1, 32)
        if symmetric:
            scale = (Wg.abs().amax(-1) / 7.5).clamp_min(1e-8)
            zp = torch.zeros_like(scale, dtype=torch.int8)
        else:
            lo, hi = Wg.amin(-1).clamp_max(0), Wg.amax(-1).clamp_min(0)
            scale = ((hi - lo) / 15).clamp_min(1e-8)
            zp = (-8 - (lo / scale).round()).clamp(-8, 7).to(torch.int8)
        packed = PackedQuantizationCompressor.compress({"weight": W, "weight_scale": scale, "weight_zero_point": zp},
                                                       scheme)
        assert ("weight_zero_point" in packed) != symmetric
        expected[name] = PackedQuantizationCompressor.decompress(packed, scheme)["weight"].float()
        state.update({f"{name}.{k}": v.contiguous() for k, v in packed.items()})
    out = tmp_path / "ct"
    out.mkdir()
    model.config.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                                    quantization_status="compressed", ignore=["lm_head"]).to_dict()
    (out / "config.json").write_text(json.dumps(cfg))
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})

    loaded = onecomp.load(out)
    for name, W in expected.items():
        torch.testing.assert_close(loaded.get_submodule(name).weight, W, atol=0, rtol=0)
    # the command line takes it as a model: perplexity on a small text file
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 40)
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=_byte_tokenizer())
    tok.save_pretrained(out)
    assert main(["eval", str(out), "--text", str(text), "--windows", "2", "--seq-len", "32", "--json",
                 "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"][str(text)] > 1


def _byte_tokenizer():
    """A 256-token byte-level tokenizer (the tiny model's vocabulary), built without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(i) if 33 <= i < 127 else f"<{i}>": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return tok


# ---------------------------------------------------------------- the exporters' view of a format


def test_as_affine_int_stands_for_the_same_weight():
    """For every registered format exposing as_affine_int: its AffineInt dequantizes to exactly what
    the format dequantizes, over random params and shapes."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from onecomp.export.common import affine_formats

    reg = Registry.default()
    names = affine_formats(reg)
    assert "gptq" in names

    @settings(deadline=None)
    @given(st.sampled_from(names), st.integers(1, 8), st.sampled_from([-1, 8, 16, 32]), st.booleans(),
           st.integers(1, 24), st.integers(1, 80), st.integers(0, 2**16))
    def check(name, bits, group_size, act_order, out, inp, seed):
        fmt = reg.get("format", name).from_dict({"bits": bits, "group_size": group_size, "act_order": act_order})
        stored = fmt.pack(fmt.example((out, inp), torch.Generator().manual_seed(seed)), (out, inp))
        a = fmt.as_affine_int(stored, (out, inp))
        assert a.shape == (out, inp) and a.bits == bits
        torch.testing.assert_close(a.dequantize(), fmt.dequantize(stored, (out, inp)), atol=0, rtol=0)

    check()
