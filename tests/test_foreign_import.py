"""Import of the classic GPTQ layout (GPTQModel, AutoGPTQ, auto-round ``auto_gptq``): ``onecomp.load`` and
``onecomp eval`` read such directories, checked against our own exporter, against a packer written here
(independent of ``onecomp.export``), and against hostile tensors. Also the benchmark harness's evaluation
of a saved peer checkpoint, which goes through this importer."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import onecomp
from onecomp import Registry
from onecomp.checkpoint import quantized_modules, save_checkpoint
from onecomp.checkpoint.shards import write_weights
from onecomp.cli import main as cli
from onecomp.errors import ModelLoadError
from onecomp.export import export
from onecomp.testing.models import make_tiny_llama

LINEARS = [f"model.layers.{i}.{p}" for i in range(2) for p in
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
LAYER = "model.layers.0.self_attn.q_proj"


def _pack_stream(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Columns of ``v [rows, cols]`` as one LSB-first bit stream of int32 words per column (GPTQ's qweight),
    bit by bit: a reference independent of onecomp.export.pack_rows."""
    words = torch.zeros((v.shape[0] * bits + 31) // 32, v.shape[1], dtype=torch.int64)
    for i in range(v.shape[0]):
        for b in range(bits):
            bit = i * bits + b
            words[bit // 32] |= ((v[i] >> b) & 1) << (bit % 32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack_stream(words: torch.Tensor, rows: int, bits: int) -> torch.Tensor:
    """Inverse of ``_pack_stream``, bit by bit."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    v = torch.zeros(rows, words.shape[1], dtype=torch.int64)
    for i in range(rows):
        for b in range(bits):
            bit = i * bits + b
            v[i] |= ((w[bit // 32] >> (bit % 32)) & 1) << b
    return v


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_reference_packer_is_a_bit_stream(bits):
    v = torch.randint(0, 2**bits, (64, 5), generator=torch.Generator().manual_seed(bits))
    packed = _pack_stream(v, bits)
    assert packed.shape == (64 * bits // 32, 5)
    assert torch.equal(_unpack_stream(packed, 64, bits), v)
    if bits == 4:  # the classic layout: eight codes per word, the first in the lowest nibble
        assert (int(packed[0, 0]) & 0xF) == int(v[0, 0]) and ((int(packed[0, 0]) >> 4) & 0xF) == int(v[1, 0])


# ---------------------------------------------------------------- a directory written by the packer above


def _write_gptq_dir(path: Path, bits: int, group_size: int, *, act_order: bool, v2: bool, seed: int = 0,
                    shard_size=None) -> dict[str, torch.Tensor]:
    """A GPTQ-layout directory of the tiny model with random codes, zeros, fp16 scales (and a shuffled
    g_idx under act-order), packed by ``_pack_stream``; returns each layer's weight computed here."""
    gen = torch.Generator().manual_seed(seed)
    model = make_tiny_llama(seed=seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    expected = {}
    for name in LINEARS:
        W = state.pop(name + ".weight")
        out, inp = W.shape
        G = inp // group_size
        q = torch.randint(0, 2**bits, (inp, out), generator=gen)
        zeros = torch.randint(0, 2**bits, (G, out), generator=gen)
        scales = (torch.rand(G, out, generator=gen) * 0.02 + 1e-3).half()
        g_idx = torch.arange(inp) // group_size
        if act_order:
            g_idx = g_idx[torch.randperm(inp, generator=gen)]
        stored_zeros = zeros if v2 else (zeros - 1) % 2**bits
        state.update({f"{name}.qweight": _pack_stream(q, bits), f"{name}.qzeros": _pack_stream(stored_zeros.T, bits).T,
                      f"{name}.scales": scales, f"{name}.g_idx": g_idx.to(torch.int32)})
        expected[name] = torch.stack([scales[g_idx[j]].float() * (q[j] - zeros[g_idx[j]]).float()
                                      for j in range(inp)], dim=1)  # [out, in], column by column
    path.mkdir(parents=True)
    model.config.save_pretrained(path)
    qc = {"bits": bits, "group_size": group_size, "desc_act": act_order, "sym": False,
          "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", **qc}
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "quantize_config.json").write_text(json.dumps(qc))
    if shard_size:
        write_weights({k: v.contiguous() for k, v in state.items()}, path, shard_size)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, path / "model.safetensors", metadata={"format": "pt"})
    return expected


@pytest.mark.parametrize("bits,act_order,v2", [(2, False, False), (3, True, False), (4, True, True),
                                               (8, False, True), (3, False, True)])
def test_an_independently_packed_directory_loads_as_its_weights(tmp_path, bits, act_order, v2):
    expected = _write_gptq_dir(tmp_path / "g", bits, 32, act_order=act_order, v2=v2, seed=bits)
    model = onecomp.load(tmp_path / "g")
    for name, W in expected.items():
        torch.testing.assert_close(model.get_submodule(name).weight, W, atol=0, rtol=0)
    source = make_tiny_llama(seed=bits)  # the other tensors come through unchanged
    torch.testing.assert_close(model.model.norm.weight, source.model.norm.weight, atol=0, rtol=0)
    torch.testing.assert_close(model.model.embed_tokens.weight, source.model.embed_tokens.weight, atol=0, rtol=0)


def test_sharded_and_side_file_only_directories_load(tmp_path):
    expected = _write_gptq_dir(tmp_path / "g", 4, 32, act_order=False, v2=False, shard_size="40KB")
    assert (tmp_path / "g" / "model.safetensors.index.json").exists()
    # the quantization settings only in quantize_config.json (older AutoGPTQ): still read
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    del cfg["quantization_config"]
    (tmp_path / "g" / "config.json").write_text(json.dumps(cfg))
    model = onecomp.load(tmp_path / "g")
    for name, W in expected.items():
        torch.testing.assert_close(model.get_submodule(name).weight, W, atol=0, rtol=0)


# ---------------------------------------------------------------- our own exporter, read back


@pytest.fixture(scope="module")
def reg():
    return Registry.default()


def _checkpoint(path, quantizer, registry, tokenizer=None, model=None):
    model = model if model is not None else make_tiny_llama(seed=0)
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    onecomp.compress(model, config={"plan": {"quantizer": quantizer}}, windows=windows, registry=registry)
    save_checkpoint(model, tokenizer, path, registry, base_model="tiny", config={}, stages=[])
    return path


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_our_gptq_export_reads_back_as_the_source_weights(tmp_path, reg, bits, act_order):
    """Quantized layers exactly (our gptq format keeps fp16 scales, which the export stores as they are);
    every other tensor as the export's fp16 copy of it."""
    ckpt = _checkpoint(tmp_path / "c", {"name": "gptq", "bits": bits, "group_size": 32, "act_order": act_order,
                                        "mse": False}, reg)
    out = export(ckpt, "gptq", tmp_path / "gptq")
    assert json.loads((out / "quantize_config.json").read_text())["desc_act"] == act_order
    source, imported = onecomp.load(ckpt), onecomp.load(out)
    layers = quantized_modules(source)
    assert sorted(layers) == sorted(LINEARS)
    for name, m in layers.items():
        assert type(imported.get_submodule(name)) is torch.nn.Linear
        torch.testing.assert_close(imported.get_submodule(name).weight, m.dequantize(), atol=0, rtol=0)
    for key, t in source.state_dict().items():
        if key.rsplit(".", 1)[0] not in layers and t.is_floating_point():
            torch.testing.assert_close(imported.state_dict()[key], t.half().float(), atol=0, rtol=0)
    # as a v2 directory (zeros stored as they are, re-packed by the packer above): the same weights
    v2 = tmp_path / "gptq-v2"
    shutil.copytree(out, v2)
    tensors = load_file(v2 / "model.safetensors")
    for name, m in layers.items():
        z = _unpack_stream(tensors[f"{name}.qzeros"].T.contiguous(), m.out_features, bits)  # [out, G]
        tensors[f"{name}.qzeros"] = _pack_stream((z + 1) % 2**bits, bits).T.contiguous()
    save_file(tensors, v2 / "model.safetensors", metadata={"format": "pt"})
    for f in ("config.json", "quantize_config.json"):
        cfg = json.loads((v2 / f).read_text())
        (cfg.get("quantization_config") or cfg)["checkpoint_format"] = "gptq_v2"
        (v2 / f).write_text(json.dumps(cfg))
    imported_v2 = onecomp.load(v2)
    for name, m in layers.items():
        torch.testing.assert_close(imported_v2.get_submodule(name).weight, m.dequantize(), atol=0, rtol=0)


# ---------------------------------------------------------------- hostile tensors and settings


@pytest.fixture(scope="module")
def exported(tmp_path_factory, reg):
    tmp = tmp_path_factory.mktemp("hostile")
    ckpt = _checkpoint(tmp / "c", {"name": "gptq", "bits": 4, "group_size": 32, "act_order": True, "mse": False},
                       reg)
    return export(ckpt, "gptq", tmp / "gptq")


def _edit_tensors(src, dst, change):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    change(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _set(key, value):
    return lambda t: t.__setitem__(key, value(t[key]))


def _g_idx_out_of_range(g):
    g = g.clone()
    g[5] = 2  # q_proj has 64 inputs in groups of 32: groups 0 and 1
    return g


HOSTILE = [
    (_set(f"{LAYER}.qweight", lambda t: t[:-1].contiguous()),
     r"qweight has shape \[7, 64\], the layer needs \[8, 64\]"),
    (_set(f"{LAYER}.g_idx", _g_idx_out_of_range), r"g_idx holds groups 0\.\.2, scales has 2"),
    (_set(f"{LAYER}.g_idx", lambda g: -g - 1), r"g_idx holds groups -2\.\.-1"),
    (_set(f"{LAYER}.g_idx", lambda g: g[:-1].contiguous()), r"g_idx is torch.int32 \[63\], the layer needs"),
    (_set(f"{LAYER}.scales", lambda s: s[:, :-1].contiguous()),
     r"scales has shape \[2, 63\], the layer needs \[2, 64\]"),
    (_set(f"{LAYER}.scales", lambda s: s.flatten()), r"scales is \[128\], the layer needs \[groups, 64\]"),
    (_set(f"{LAYER}.scales", lambda s: s.masked_fill(torch.ones_like(s, dtype=torch.bool), float("nan"))),
     "scales holds non-finite values"),
    (_set(f"{LAYER}.qzeros", lambda z: z[:, :-1].contiguous()), r"qzeros has shape \[2, 7\], the layer needs \[2, 8\]"),
    (_set(f"{LAYER}.qweight", lambda t: t.float()), r"qweight is torch.float32, the GPTQ layout packs int32"),
    (lambda t: t.pop(f"{LAYER}.qzeros"), "tensor qzeros is missing"),
    (lambda t: t.update({"model.layers.0.mlp.nope.qweight": t[f"{LAYER}.qweight"].clone()}),
     r"model.layers.0.mlp.nope.qweight belongs to no linear layer"),
    (lambda t: t.pop("model.norm.weight"), r"missing \['model.norm.weight'\]"),
    (_set("model.norm.weight", lambda w: w[:-1].contiguous()), r"model.norm.weight \[63\] \(the model's is \[64\]\)"),
    (lambda t: t.update({f"{LAYER}.weight": torch.zeros(64, 64)}), rf"unexpected \['{LAYER}.weight'\]"),
]


@pytest.mark.parametrize("change,message", HOSTILE)
def test_hostile_tensors_are_refused_naming_module_and_tensor(exported, tmp_path, change, message):
    bad = _edit_tensors(exported, tmp_path / "bad", change)
    with pytest.raises(ModelLoadError, match=message) as info:
        onecomp.load(bad)
    if "nope" not in message and "norm" not in message and "unexpected" not in message:  # module and tensor named
        assert f"module {LAYER}: tensor " in str(info.value)


@pytest.mark.parametrize("setting,value,message", [
    ("bits", 5, "GPTQ bits 5; 2, 3, 4, 8 are read"),
    ("checkpoint_format", "marlin", "checkpoint_format 'marlin'; gptq, gptq_v2 are read"),
    ("group_size", "32", "group_size '32' is not"),
    ("group_size", 0, "group_size 0 is not a positive integer or -1"),
    ("pack_dtype", "int16", "pack_dtype 'int16'"),
])
def test_settings_outside_the_layout_are_refused(exported, tmp_path, setting, value, message):
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"][setting] = value
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=message):
        onecomp.load(bad)


def test_every_tensor_is_checked_before_the_model_is_allocated(exported, tmp_path, monkeypatch):
    """A bad last layer fails with only the meta-device skeleton built: nothing allocated, nothing unpacked."""
    import transformers

    built, real = [], transformers.AutoModelForCausalLM.from_config
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config",
                        lambda *a, **k: built.append(str(torch.get_default_device())) or real(*a, **k))
    last = "model.layers.1.mlp.down_proj"
    bad = _edit_tensors(exported, tmp_path / "bad", _set(f"{last}.g_idx", lambda g: g + 100))
    with pytest.raises(ModelLoadError, match=f"module {last}: tensor g_idx holds groups"):
        onecomp.load(bad)
    assert built == ["meta"]
    onecomp.load(exported)
    assert built == ["meta", "meta", "cpu"]


def test_act_order_without_g_idx_is_refused(exported, tmp_path):
    bad = _edit_tensors(exported, tmp_path / "bad", lambda t: t.pop(f"{LAYER}.g_idx"))
    with pytest.raises(ModelLoadError, match=f"module {LAYER}: tensor g_idx is missing, and desc_act is set"):
        onecomp.load(bad)


# ---------------------------------------------------------------- the command line and the benchmark harness


@pytest.fixture(scope="module")
def exported_with_tokenizer(tmp_path_factory, reg, tiny_model_dir):
    from transformers import AutoTokenizer

    from onecomp.models import load_model

    tmp = tmp_path_factory.mktemp("cli")
    ckpt = _checkpoint(tmp / "c", {"name": "rtn", "bits": 4, "group_size": 32}, reg,
                       AutoTokenizer.from_pretrained(tiny_model_dir), load_model(str(tiny_model_dir)).model)
    return ckpt, export(ckpt, "gptq", tmp / "gptq")


def test_onecomp_eval_reads_a_gptq_directory(exported_with_tokenizer, tmp_path, capsys):
    ckpt, out = exported_with_tokenizer
    text = tmp_path / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 30)
    ppl = {}
    for path in (ckpt, out):
        assert cli(["eval", str(path), "--text", str(text), "--windows", "2", "--seq-len", "32", "--json",
                    "--quiet"]) == 0
        ppl[path] = json.loads(capsys.readouterr().out)["ppl"][str(text)]
    # the same quantized weights; the export stores the other tensors (embeddings, norms) in fp16
    assert ppl[out] == pytest.approx(ppl[ckpt], rel=1e-3)


@pytest.mark.parametrize("target,importer", [("gptq", "load_gptq"), ("compressed-tensors", "load_pack_quantized")])
def test_the_harness_evaluates_a_saved_peer_checkpoint_through_onecomp_load(exported_with_tokenizer, tmp_path,
                                                                             target, importer):
    """benchmarks/peers: a runner's evaluation of the directory a peer saved (GPTQ layout: gptqmodel,
    auto-round; pack-quantized: llmcompressor) is onecomp.load of it, in the interpreter that has our
    onecomp, with the runners' own perplexity."""
    import argparse

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks" / "peers"))
    try:
        import peer_common
    finally:
        sys.path.pop(0)
    ckpt, _ = exported_with_tokenizer
    out = export(ckpt, target, tmp_path / target)
    windows = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = tmp_path / "inputs.safetensors"
    save_file({"calib": windows.clone(), "eval/a": windows, "eval/b": windows.flip(1).contiguous()}, inputs)
    args = argparse.Namespace(threads=torch.get_num_threads(), name="w4", setting={"bits": 4}, inputs=str(inputs),
                              out=str(tmp_path / "run"))
    run = peer_common.Run("a-peer", args, [])
    run.evaluate_saved(out)
    model = onecomp.load(out)
    for text, w in {"a": windows, "b": windows.flip(1)}.items():
        assert run.row["ppl"][text] == pytest.approx(peer_common.perplexity(model, w), rel=1e-6)
    assert run.row["saved_eval"]["loader"] == "onecomp.load" and run.row["saved_eval"]["importer"] == importer
