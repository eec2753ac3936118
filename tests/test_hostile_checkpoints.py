"""Checkpoints are untrusted input: crafted manifests, files and configs are refused with one clean
error before anything outside the directory is opened, any code runs, or any large tensor is allocated."""

import json
import os
import shutil
import signal
import stat

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onecomp
from onecomp import CheckpointError, Registry
from onecomp.checkpoint import save_checkpoint
from onecomp.checkpoint.io import sha256
from onecomp.cli import main as cli
from onecomp.errors import ModelLoadError
from onecomp.models import load_model

EVIL = "import pathlib; pathlib.Path(__file__).with_name('RAN').write_text('code from a checkpoint ran')\n"


@pytest.fixture(scope="module")
def pristine(tiny_model_dir, tmp_path_factory):
    """A real gptq (RTN) checkpoint of the tiny model, with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    cfg = {"plan": {"planner": "uniform", "quantizer": {"name": "rtn", "bits": 4, "group_size": 32}}}
    onecomp.compress(model, config=cfg, windows=torch.zeros(1, 8, dtype=torch.long))
    path = tmp_path_factory.mktemp("hostile") / "ckpt"
    save_checkpoint(model, AutoTokenizer.from_pretrained(tiny_model_dir), path, Registry.default(),
                    base_model="tiny", config=cfg, stages=[])
    return path


@pytest.fixture
def ckpt(pristine, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(pristine, path, symlinks=True)
    return path


def edit(path, change):
    manifest = json.loads((path / "onecomp.json").read_text())
    change(manifest)
    (path / "onecomp.json").write_text(json.dumps(manifest))


def rehash(path, *names):
    """Record the current hash of ``names``, as a forger would."""
    edit(path, lambda m: m["files"].update({n: sha256(path / n) for n in names}))


def no_hang(seconds=20):
    def boom(*_):
        raise TimeoutError("the loader blocked")

    signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)


def test_the_pristine_checkpoint_loads(ckpt):
    model = onecomp.load(ckpt)
    assert onecomp.checkpoint.quantized_modules(model)


@pytest.mark.parametrize("name", ["/etc/passwd", "/no/such/file", "../outside.txt", "../no-such-file",
                                  "sub/../../outside.txt", "./config.json", "", "a\\..\\b"])
def test_file_names_outside_the_directory_are_refused_alike(ckpt, name):
    (ckpt.parent / "outside.txt").write_text("secret")
    edit(ckpt, lambda m: m["files"].update({name: "0" * 64}))
    with pytest.raises(CheckpointError) as err:
        onecomp.load(ckpt)
    message = str(err.value).replace(repr(name), "NAME")
    assert "must name a regular file inside the checkpoint directory" in message
    assert "secret" not in message and "missing" not in message and "No such file" not in message


def test_symlinks_leaving_the_directory_say_the_same_whether_the_target_exists(ckpt):
    (ckpt.parent / "outside.txt").write_text("secret")
    os.symlink(ckpt.parent / "outside.txt", ckpt / "exists.txt")
    os.symlink(ckpt.parent / "nothing-here.txt", ckpt / "absent.txt")
    messages = []
    for name in ("exists.txt", "absent.txt"):
        edit(ckpt, lambda m: m["files"].update({name: "0" * 64}))
        with pytest.raises(CheckpointError) as err:
            onecomp.checkpoint.verify(ckpt)
        messages.append(str(err.value).replace(name, "NAME"))
        edit(ckpt, lambda m: m["files"].pop(name))
    assert messages[0] == messages[1] and "regular file inside" in messages[0]


def test_fifos_and_devices_are_refused_without_blocking(ckpt):
    os.mkfifo(ckpt / "pipe")
    edit(ckpt, lambda m: m["files"].update({"pipe": "0" * 64}))
    no_hang()
    try:
        with pytest.raises(CheckpointError, match="regular file inside"):
            onecomp.load(ckpt)
        os.remove(ckpt / "pipe")
        edit(ckpt, lambda m: m["files"].pop("pipe"))
        os.symlink("/dev/zero", ckpt / "zero")
        edit(ckpt, lambda m: m["files"].update({"zero": "0" * 64}))
        with pytest.raises(CheckpointError, match="regular file inside"):
            onecomp.load(ckpt)
        os.remove(ckpt / "onecomp.json")
        os.symlink("/dev/zero", ckpt / "onecomp.json")
        with pytest.raises(CheckpointError, match="regular JSON file"):
            onecomp.load(ckpt)
    finally:
        signal.alarm(0)


def test_integrity_cannot_be_switched_off_by_editing_the_manifest(ckpt):
    edit(ckpt, lambda m: m["files"].pop("config.json"))
    with pytest.raises(CheckpointError, match="must list config.json"):
        onecomp.load(ckpt)
    rehash(ckpt, "config.json")
    edit(ckpt, lambda m: m["files"].pop("tokenizer.json"))
    with pytest.raises(CheckpointError, match="not listed.*tokenizer.json"):
        onecomp.load(ckpt)
    rehash(ckpt, "tokenizer.json")
    edit(ckpt, lambda m: m.update(files={}))
    with pytest.raises(CheckpointError, match="files"):
        onecomp.load(ckpt)


def test_unlisted_code_is_refused_and_listed_code_never_runs(ckpt, monkeypatch, capsys):
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("the loader asked a question"))
    (ckpt / "modeling_evil.py").write_text(EVIL)
    (ckpt / "README.md").write_text("docs are fine unlisted")
    with pytest.raises(CheckpointError, match="not listed.*modeling_evil.py"):
        onecomp.load(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"}
    (ckpt / "config.json").write_text(json.dumps(config))
    rehash(ckpt, "config.json", "modeling_evil.py")
    for command in (["inspect", str(ckpt)], ["eval", str(ckpt), "--windows", "1", "--seq-len", "16", "--quiet"]):
        code = cli(command)
        assert not (ckpt / "RAN").exists()
        if code != 0:
            err = capsys.readouterr().err
            assert code == 2 and err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    model = onecomp.load(ckpt)  # the built-in Llama class, never the checkpoint's
    assert type(model).__module__.startswith("transformers.") and not (ckpt / "RAN").exists()


def test_a_plain_model_with_custom_code_is_refused_unless_trusted(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("the loader asked a question"))
    path = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config.pop("model_type")
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (path / "config.json").write_text(json.dumps(config))
    (path / "configuration_evil.py").write_text(EVIL)
    (path / "modeling_evil.py").write_text(EVIL)
    with pytest.raises(ModelLoadError, match="trust-remote-code"):
        load_model(str(path))
    assert cli(["inspect", str(path)]) == 2
    assert "error: " in capsys.readouterr().err
    assert not (path / "RAN").exists()


@pytest.mark.parametrize("keep_quantization_config", [True, False])
def test_onecomp_tensors_without_the_manifest_are_refused(ckpt, capsys, keep_quantization_config):
    os.remove(ckpt / "onecomp.json")
    if not keep_quantization_config:  # as older checkpoints, or a config.json edited by hand
        config = json.loads((ckpt / "config.json").read_text())
        config.pop("quantization_config", None)
        (ckpt / "config.json").write_text(json.dumps(config))
    message = "no onecomp.json|OneComp checkpoint"
    with pytest.raises(ModelLoadError, match=message):
        load_model(str(ckpt))
    for command in (["eval", str(ckpt), "--windows", "1", "--seq-len", "16", "--quiet"], ["inspect", str(ckpt)]):
        assert cli(command) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
        if not keep_quantization_config:
            assert "no onecomp.json" in err
    with pytest.raises(CheckpointError, match="onecomp.json is missing"):
        onecomp.load(ckpt)


LAYER = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(schema="1"), "schema"),
    (lambda m: m.update(files=["config.json"]), "files"),
    (lambda m: m["files"].update({"config.json": 5}), "sha256"),
    (lambda m: m.update(modules=[]), "modules"),
    (lambda m: m["modules"].update({LAYER: "gptq"}), LAYER),
    (lambda m: m["modules"][LAYER].pop("format"), "format"),
    (lambda m: m["modules"][LAYER].update(format=["gptq"]), "format"),
    (lambda m: m["modules"][LAYER].update(format="nope"), "no installed plugin"),
    (lambda m: m["modules"][LAYER].update(version="1"), "version"),
    (lambda m: m["modules"][LAYER].update(version=99), "newer"),
    (lambda m: m["modules"][LAYER].update(shape=[0, 64]), "shape"),
    (lambda m: m["modules"][LAYER].update(shape=[64, 10**12]), "shape"),
    (lambda m: m["modules"][LAYER].update(shape=[32, 64]), "shape"),
    (lambda m: m["modules"][LAYER].update(params={"bits": 99}), "params"),
    (lambda m: m["modules"][LAYER].update(params="bits=4"), "params"),
    (lambda m: m["modules"].update({"model.nope": m["modules"][LAYER]}), "model.nope"),
    (lambda m: m["modules"].update({"model.layers.0.input_layernorm": m["modules"][LAYER]}), "input_layernorm"),
])
def test_malformed_manifests_are_clean_errors(ckpt, change, message):
    edit(ckpt, change)
    with pytest.raises(CheckpointError, match=message):
        onecomp.load(ckpt)


@pytest.mark.parametrize("key, value", [("hidden_size", 2**20), ("vocab_size", 10**9), ("num_hidden_layers", 10**9),
                                        ("intermediate_size", 10**7), ("num_hidden_layers", 40)])
def test_absurd_declared_sizes_fail_before_allocating(ckpt, key, value):
    config = json.loads((ckpt / "config.json").read_text())
    config[key] = value
    (ckpt / "config.json").write_text(json.dumps(config))
    rehash(ckpt, "config.json")
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="config.json"):
        onecomp.load(ckpt)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing large allocated


def test_non_finite_tensors_are_never_written_nor_loaded(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    model = onecomp.load(ckpt, backend=None)
    with torch.no_grad():
        model.get_submodule(LAYER).stored()["scales"][0, 0] = float("inf")
    with pytest.raises(CheckpointError, match=f"{LAYER}: tensor 'scales' holds 1 non-finite"):
        save_checkpoint(model, None, tmp_path / "out", Registry.default(), base_model="t", config={}, stages=[])
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))
    model = onecomp.load(ckpt, backend=None)
    model.get_submodule("model.norm").weight.data[3] = float("nan")
    with pytest.raises(CheckpointError, match="model.norm: tensor 'weight'"):
        save_checkpoint(model, None, tmp_path / "out", Registry.default(), base_model="t", config={}, stages=[])
    tensors = load_file(ckpt / "model.safetensors")
    tensors[f"{LAYER}.scales"][1, 0] = float("nan")
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    rehash(ckpt, "model.safetensors")
    with pytest.raises(CheckpointError, match=f"{LAYER}: tensor 'scales'"):
        onecomp.load(ckpt)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=3),
                           max_leaves=12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_random_manifests_load_or_raise_a_checkpoint_error(pristine, tmp_path_factory, data):
    """Random values at random places of a real manifest (or a random manifest): a model or a CheckpointError."""
    path = tmp_path_factory.mktemp("fuzz") / "ckpt"
    shutil.copytree(pristine, path)
    manifest = json.loads((path / "onecomp.json").read_text())
    if data.draw(st.booleans()):
        manifest = data.draw(json_values)
    else:
        for _ in range(data.draw(st.integers(1, 3))):
            modules = manifest.get("modules")
            if not isinstance(modules, dict) or not modules:  # an earlier edit replaced them
                break
            entry = modules[data.draw(st.sampled_from(sorted(modules)))]
            where = data.draw(st.sampled_from(["top", "files", "module", "params"]))
            target = {"top": manifest, "files": manifest.get("files"), "module": entry,
                      "params": entry.get("params", {}) if isinstance(entry, dict) else None}[where]
            if not isinstance(target, dict):
                continue
            key = data.draw(st.sampled_from(sorted(target) + ["extra"]) if target else st.just("extra"))
            target[key] = data.draw(json_values)
    (path / "onecomp.json").write_text(json.dumps(manifest))
    try:
        onecomp.load(path)
    except CheckpointError:
        pass
    shutil.rmtree(path)
