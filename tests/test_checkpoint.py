"""Checkpoints: QuantLinear modules saved and reloaded, hashes checked, writes atomic."""

import json
import os

import pytest
import torch

import onecomp
import onecomp.checkpoint.io as ckpt_io
from onecomp import CheckpointError, Registry, stored_bits
from onecomp.builtin.dense import Dense
from onecomp.checkpoint import QuantLinear, bits_summary, quantized_modules, read_manifest, save_checkpoint, verify
from onecomp.models import inspect_model


@pytest.fixture
def registry():
    return Registry(entry_points=False)


def quantize_dense(model, dtype="float32"):
    """Replace every decoder linear with a QuantLinear holding a ``dense`` weight."""
    fmt = Dense.from_dict({"dtype": dtype})
    for name in inspect_model(model).linear_names():
        linear = model.get_submodule(name)
        shape = tuple(linear.weight.shape)
        stored = fmt.pack({"weight": linear.weight.detach()}, shape)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantLinear(fmt, shape, stored, linear.bias))
    return model


@pytest.fixture
def ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def save(model, path, registry, **kw):
    return save_checkpoint(model, None, path, registry, **{"base_model": "tiny", "config": {}, "stages": [], **kw})


def test_save_and_load_give_the_same_logits(tiny_llama, tmp_path, registry, ids):
    with torch.no_grad():
        fp_logits = tiny_llama(ids).logits
    model = quantize_dense(tiny_llama)
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, fp_logits)  # fp32 dense is lossless
    manifest = save(model, tmp_path / "ckpt", registry, config={"seed": 1}, stages=[{"name": "layerwise"}])

    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors",
                                                                   "onecomp.json"]
    assert read_manifest(tmp_path / "ckpt") == manifest
    assert manifest["base_model"] == "tiny" and manifest["onecomp_version"] == onecomp.__version__
    assert manifest["config"] == {"seed": 1} and manifest["stages"] == [{"name": "layerwise"}]
    assert set(manifest["files"]) == {"config.json", "model.safetensors"}
    assert len(manifest["modules"]) == 14
    entry = manifest["modules"]["model.layers.0.self_attn.k_proj"]
    assert entry == {"format": "dense", "version": 1, "params": {"dtype": "float32"}, "shape": [32, 64],
                     "dist": "onecomp", "dist_version": entry["dist_version"], "bits": 32 * 32 * 64}
    assert manifest["bits"]["bits_per_weight"] == 32.0

    loaded = onecomp.load(tmp_path / "ckpt", registry)
    mods = quantized_modules(loaded)
    assert set(mods) == set(manifest["modules"])
    assert all(m.format.name == "dense" and m.format.params.dtype == "float32" for m in mods.values())
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=0)
    assert not loaded.training and loaded.config.use_cache is False


def test_half_precision_dense_round_trip(tiny_llama, tmp_path, registry, ids):
    model = quantize_dense(tiny_llama, "float16")
    assert bits_summary(model)["bits_per_weight"] == 16.0
    with torch.no_grad():
        logits = model(ids).logits
    save(model, tmp_path / "ckpt", registry)
    loaded = onecomp.load(tmp_path / "ckpt", registry)
    assert loaded.model.layers[1].mlp.up_proj.stored()["weight"].dtype == torch.float16
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=0)


@pytest.fixture
def checkpoint(tiny_llama, tmp_path, registry):
    path = tmp_path / "ckpt"
    save(quantize_dense(tiny_llama), path, registry)
    return path


def test_corrupted_weights_are_detected(checkpoint, registry):
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupted"):
        onecomp.load(checkpoint, registry)
    with pytest.raises(CheckpointError, match="corrupted"):
        verify(checkpoint)


def test_missing_file_and_manifest(checkpoint, registry, tmp_path):
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json listed in onecomp.json is missing"):
        onecomp.load(checkpoint, registry)
    with pytest.raises(CheckpointError, match="not a onecomp checkpoint"):
        onecomp.load(tmp_path, registry)
    (checkpoint / "onecomp.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="onecomp.json is corrupted"):
        onecomp.load(checkpoint, registry)


def edit_manifest(path, fn):
    manifest = json.loads((path / "onecomp.json").read_text())
    fn(manifest)
    (path / "onecomp.json").write_text(json.dumps(manifest))


def test_unregistered_format_names_the_distribution_to_install(checkpoint, registry):
    def use_missing_format(manifest):
        entry = manifest["modules"]["model.layers.0.mlp.up_proj"]
        entry.update(format="fancy4", dist="onecomp-fancy")

    edit_manifest(checkpoint, use_missing_format)
    with pytest.raises(CheckpointError) as info:
        onecomp.load(checkpoint, registry)
    msg = str(info.value)
    assert "model.layers.0.mlp.up_proj" in msg and "'fancy4'" in msg and "pip install onecomp-fancy" in msg


def test_newer_format_version_is_refused(checkpoint, registry):
    edit_manifest(checkpoint, lambda m: m["modules"]["model.layers.1.mlp.down_proj"].update(version=99))
    with pytest.raises(CheckpointError, match="version 99 is newer than the installed 1"):
        onecomp.load(checkpoint, registry)


def test_stored_tensors_must_fit_the_format(checkpoint, registry):
    edit_manifest(checkpoint, lambda m: m["modules"]["model.layers.0.self_attn.q_proj"].update(
        params={"dtype": "float16"}))
    with pytest.raises(CheckpointError, match=r"model.layers.0.self_attn.q_proj: .*expected \(64, 64\) torch.float16"):
        onecomp.load(checkpoint, registry)


def test_saving_over_a_checkpoint_is_atomic(tiny_llama, tmp_path, registry, monkeypatch):
    model = quantize_dense(tiny_llama)
    path = tmp_path / "ckpt"
    save(model, path, registry, stages=[{"name": "first"}])
    save(model, path, registry, stages=[{"name": "second"}])
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporary or old directories left
    assert read_manifest(path)["stages"] == [{"name": "second"}]
    verify(path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save(model, path, registry, stages=[{"name": "third"}])
    assert os.listdir(tmp_path) == ["ckpt"]
    assert read_manifest(path)["stages"] == [{"name": "second"}]
    verify(path)


def test_quantlinear_is_a_drop_in_linear():
    fmt = Dense.from_dict({"dtype": "float32"})
    lin = torch.nn.Linear(8, 4)
    q = QuantLinear(fmt, (4, 8), fmt.pack({"weight": lin.weight.detach()}, (4, 8)), lin.bias)
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(q(x), lin(x))
    assert stored_bits(q.stored()) == 4 * 8 * 32 and "format=dense" in repr(q)
    assert set(q.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(q.weight, lin.weight.detach())
