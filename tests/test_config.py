"""Config building and pipeline config loading: every error names its path and what is allowed."""

import json
from types import SimpleNamespace

import attrs
import pytest
import yaml

from onecomp import ConfigError, Quantizer, Refiner, Registry, hookimpl, in_range, one_of
from onecomp.config import (CalibrationSection, CorpusSpec, DEFAULT_PIPELINE, PipelineConfig, build_config,
                            load_config, read_file)


@attrs.define
class Params:
    bits: int = attrs.field(default=4, validator=in_range(1, 8))
    alpha: float = attrs.field(default=0.5, validator=in_range(0, 1))
    damp: float = attrs.field(default=0.01, validator=in_range(0, None, lo_open=True))
    mode: str = attrs.field(default="sym", validator=one_of("sym", "asym"))
    act_order: bool = False


@attrs.define
class DummyGPTQConfig:
    bits: int = attrs.field(default=4, validator=in_range(1, 8))
    group_size: int = 128
    act_order: bool = False


class DummyGPTQ(Quantizer):
    name = "gptq"
    Config = DummyGPTQConfig
    needs = frozenset({"hessian"})

    def quantize(self, task):
        raise AssertionError("config tests never quantize")


@attrs.define
class SmoothConfig:
    alpha: float = attrs.field(default=0.5, validator=in_range(0, 1))


class Smooth(Refiner):
    name = "smooth"
    Config = SmoothConfig
    scope = "layer"

    def adjust(self, task):
        return task


class DummyQEP(Smooth):
    name = "qep"
    Config = SmoothConfig


@pytest.fixture
def reg():
    """An isolated registry with stand-ins for what the default pipeline names (``gptq``, ``qep``)
    and a ``smooth`` refiner."""
    r = Registry(entry_points=False)

    @hookimpl
    def register_quantizers(register):
        register(DummyGPTQ)

    @hookimpl
    def register_refiners(register):
        register(Smooth)
        register(DummyQEP)

    with r.temporarily(SimpleNamespace(register_quantizers=register_quantizers,
                                       register_refiners=register_refiners), name="dummies"):
        yield r


def pipeline(**sections):
    """A minimal pipeline dict: the given sections plus a quantizer table."""
    return {"plan": {"quantizer": "gptq"}, **sections}


def error(fn, *args, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kw)
    return info.value


# ------------------------------------------------------------------ build_config


def test_build_config_defaults_and_values():
    assert build_config(Params, {}) == Params()
    p = build_config(Params, {"bits": 3, "alpha": 1, "mode": "asym", "act_order": True}, "q")
    assert p == Params(bits=3, alpha=1.0, mode="asym", act_order=True)
    assert isinstance(p.alpha, float)  # an integer is accepted for a float and converted


def test_unknown_key_lists_allowed_keys():
    e = error(build_config, Params, {"bitz": 3}, "plan.quantizer")
    assert e.path == "plan.quantizer.bitz"
    assert e.message == "unknown key; allowed: bits, alpha, damp, mode, act_order"
    assert str(e) == "plan.quantizer.bitz: unknown key; allowed: bits, alpha, damp, mode, act_order"
    assert error(build_config, Params, {"bitz": 3}).path == "bitz"


@pytest.mark.parametrize("key, value, expected", [
    ("bits", "4", "must be an integer, got '4'"),
    ("bits", 4.0, "must be an integer, got 4.0"),
    ("bits", True, "must be an integer, got True"),
    ("alpha", "half", "must be a number, got 'half'"),
    ("alpha", False, "must be a number, got False"),
    ("mode", 1, "must be a string, got 1"),
    ("act_order", 1, "must be true or false, got 1"),
])
def test_wrong_type_names_the_path(key, value, expected):
    e = error(build_config, Params, {key: value}, "refiners[2]")
    assert e.path == f"refiners[2].{key}"
    assert e.message == expected


@pytest.mark.parametrize("params, path, message", [
    ({"bits": 0}, "q.bits", "must be in [1, 8], got 0"),
    ({"bits": 9}, "q.bits", "must be in [1, 8], got 9"),
    ({"alpha": 1.5}, "q.alpha", "must be in [0, 1], got 1.5"),
    ({"alpha": -0.1}, "q.alpha", "must be in [0, 1], got -0.1"),
    ({"damp": 0}, "q.damp", "must be in (0, inf], got 0.0"),
    ({"mode": "both"}, "q.mode", "must be one of 'sym', 'asym', got 'both'"),
])
def test_validator_messages(params, path, message):
    e = error(build_config, Params, params, "q")
    assert (e.path, e.message) == (path, message)


def test_validators_without_a_path():
    e = error(build_config, Params, {"bits": 9})
    assert (e.path, str(e)) == ("bits", "bits: must be in [1, 8], got 9")


def test_in_range_open_bounds_and_bools():
    @attrs.define
    class Open:
        x: float = attrs.field(default=0.5, validator=in_range(0, 1, lo_open=True, hi_open=True))

    assert error(build_config, Open, {"x": 1.0}).message == "must be in (0, 1), got 1.0"
    assert build_config(Open, {"x": 0.999}).x == 0.999
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\), got True"):
        Open(True)  # bools are not numbers, even when constructed directly


def test_not_a_table():
    e = error(build_config, Params, ["bits", 4], "plan.quantizer")
    assert e.path == "plan.quantizer" and "must be a table" in e.message


def test_config_error_under():
    assert ConfigError("alpha", "bad").under("refiners[1]").path == "refiners[1].alpha"
    assert ConfigError("[0].source", "bad").under("calibration.corpus").path == "calibration.corpus[0].source"
    assert isinstance(ConfigError("a", "b"), ValueError)


# ------------------------------------------------------------------ load_config


def test_default_pipeline_loads(reg):
    cfg = load_config(None, registry=reg)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.quantizer.name == "gptq" and cfg.quantizer.config == DummyGPTQConfig(bits=4, group_size=128)
    assert cfg.planner.name == "uniform" and cfg.backend.name == "torch"
    assert cfg.calibration.corpus == [CorpusSpec(source="kjv")]
    assert [r.name for r in cfg.refiners] == [t["name"] for t in DEFAULT_PIPELINE.get("refiners", [])]
    assert cfg.to_dict() == DEFAULT_PIPELINE


def test_unknown_top_level_section(reg):
    e = error(load_config, {"modle": {"id": "x"}}, registry=reg)
    assert e.path == "modle"
    assert "unknown section; allowed: model, calibration, plan, refiners" in e.message


@pytest.mark.parametrize("samples, message", [
    (0, "must be a positive integer, got 0"),
    (-3, "must be a positive integer, got -3"),
    ("many", "must be an integer, got 'many'"),
    (12.5, "must be an integer, got 12.5"),
])
def test_bad_calibration_samples(reg, samples, message):
    e = error(load_config, {"calibration": {"samples": samples}}, registry=reg)
    assert (e.path, e.message) == ("calibration.samples", message)


def test_unknown_model_key_and_bad_dtype(reg):
    assert error(load_config, {"model": {"name": "x"}}, registry=reg).path == "model.name"
    e = error(load_config, {"model": {"dtype": "float64"}}, registry=reg)
    assert e.path == "model.dtype" and "'float32', 'bfloat16', 'float16'" in e.message


def test_refiner_with_unknown_name_lists_installed_refiners(reg):
    e = error(load_config, pipeline(refiners=[{"name": "qepp"}]), registry=reg)
    assert e.path == "refiners[0].name"
    assert "no refiner named 'qepp'; installed: blockwise, global, qep, smooth (did you mean 'qep'?)" in e.message


def test_refiner_param_errors_name_their_index(reg):
    raw = pipeline(refiners=[{"name": "smooth"}, {"name": "smooth", "alpha": 2}])
    e = error(load_config, raw, registry=reg)
    assert (e.path, e.message) == ("refiners[1].alpha", "must be in [0, 1], got 2.0")
    assert error(load_config, pipeline(refiners=[{"alpha": 1}]), registry=reg).path == "refiners[0]"
    assert error(load_config, pipeline(refiners={"name": "smooth"}), registry=reg).path == "refiners"


def test_quantizer_params_are_validated_by_its_config(reg):
    e = error(load_config, {"plan": {"quantizer": {"name": "gptq", "bits": 12}}}, registry=reg)
    assert (e.path, e.message) == ("plan.quantizer.bits", "must be in [1, 8], got 12")
    e = error(load_config, {"plan": {"quantizer": {"name": "gptq", "groupsize": 64}}}, registry=reg)
    assert e.path == "plan.quantizer.groupsize" and "allowed: bits, group_size, act_order" in e.message
    e = error(load_config, {"plan": {"quantizer": {"name": "awq"}}}, registry=reg)
    assert e.path == "plan.quantizer.name" and "installed: gptq" in e.message


def test_plan_keys_go_to_the_planner(reg):
    cfg = load_config({"plan": {"planner": "uniform", "ignore": ["mlp.down_proj"], "quantizer": "gptq"}},
                      registry=reg)
    assert cfg.planner.config.ignore == ["mlp.down_proj"]
    assert cfg.quantizer.config == DummyGPTQConfig()
    e = error(load_config, {"plan": {"planner": {"name": "uniform"}, "ignore": []}}, registry=reg)
    assert e.path == "plan.ignore"


def test_calibration_corpus_forms(reg, tmp_path):
    a, b = str(tmp_path / "a.txt"), str(tmp_path / "b.txt")
    for f in (a, b):
        open(f, "w").write("text")
    cfg = load_config(pipeline(calibration={"corpus": [{"source": a, "weight": 3}, b]}), registry=reg)
    assert cfg.calibration.corpus == [CorpusSpec(a, 3.0), CorpusSpec(b, 1.0)]
    e = error(load_config, pipeline(calibration={"corpus": [{"source": a, "weight": 0}]}), registry=reg)
    assert e.path == "calibration.corpus[0].weight"
    assert error(load_config, pipeline(calibration={"corpus": []}), registry=reg).path == "calibration.corpus"


def test_seed_backend_and_required_plugins(reg):
    assert error(load_config, pipeline(seed=True), registry=reg).path == "seed"
    e = error(load_config, pipeline(backend={"name": "torch", "device": "tpu"}), registry=reg)
    assert e.path == "backend.device"
    e = error(load_config, pipeline(backend={"name": "torch", "mmap_threshold_mb": 64}), registry=reg)
    assert e.path == "backend.mmap_threshold_mb"
    e = error(load_config, pipeline(plugins={"require": ["onecomp-not-installed-anywhere>=1.0"]}), registry=reg)
    assert e.path == "plugins.require[0]" and "pip install" in e.message
    assert error(load_config, pipeline(plugins={"needs": []}), registry=reg).path == "plugins"
    load_config(pipeline(plugins={"require": ["onecomp"]}), registry=reg)


def pipeline_dict(notes):
    """The whole pipeline as a dict; ``notes`` is an existing text file used as a second corpus."""
    return {
        "model": {"id": "smollm2-135m", "dtype": "float32"},
        "calibration": {"corpus": [{"source": "kjv", "weight": 2.0}, {"source": notes, "weight": 1.0}],
                        "samples": 64, "seq_len": 256, "seed": 7},
        "plan": {"planner": "uniform",
                 "quantizer": {"name": "gptq", "bits": 3, "group_size": -1, "act_order": True}},
        "refiners": [{"name": "smooth", "alpha": 0.25}, {"name": "smooth"}],
        "backend": {"name": "torch", "device": "cpu"},
        "evaluation": {"texts": ["kjv-gospels"], "windows": 8},
        "output": {"dir": "runs/test"},
        "seed": 3,
    }


TOML = """
seed = 3

[model]
id = "smollm2-135m"
dtype = "float32"

[calibration]
corpus = [{ source = "kjv", weight = 2.0 }, { source = "NOTES", weight = 1.0 }]
samples = 64
seq_len = 256
seed = 7

[plan]
planner = "uniform"
quantizer = { name = "gptq", bits = 3, group_size = -1, act_order = true }

[[refiners]]
name = "smooth"
alpha = 0.25

[[refiners]]
name = "smooth"

[backend]
name = "torch"
device = "cpu"

[evaluation]
texts = ["kjv-gospels"]
windows = 8

[output]
dir = "runs/test"
"""


def test_toml_yaml_and_json_files_give_the_same_config(reg, tmp_path):
    notes = str(tmp_path / "notes.txt")
    open(notes, "w").write("some calibration text")
    raw = pipeline_dict(notes)
    (tmp_path / "p.toml").write_text(TOML.replace("NOTES", notes))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "p.json").write_text(json.dumps(raw))
    configs = [load_config(tmp_path / f"p.{ext}", registry=reg) for ext in ("toml", "yaml", "json")]
    from_dict = load_config(raw, registry=reg)
    assert configs[0] == configs[1] == configs[2] == from_dict
    cfg = configs[0]
    assert cfg.quantizer.config == DummyGPTQConfig(bits=3, group_size=-1, act_order=True)
    assert [r.config.alpha for r in cfg.refiners] == [0.25, 0.5]
    assert cfg.calibration == CalibrationSection(corpus=[CorpusSpec("kjv", 2.0), CorpusSpec(notes, 1.0)],
                                                 samples=64, seq_len=256, seed=7)
    assert cfg.backend.config.device == "cpu" and cfg.seed == 3 and cfg.output.dir == "runs/test"
    assert load_config(str(tmp_path / "p.toml"), registry=reg) == cfg


def test_file_errors(tmp_path):
    assert "does not exist" in str(error(read_file, tmp_path / "missing.toml"))
    (tmp_path / "p.ini").write_text("[model]\n")
    assert "must end in .toml, .yaml, .yml or .json" in str(error(read_file, tmp_path / "p.ini"))
    (tmp_path / "bad.toml").write_text("[model\n")
    assert "cannot parse" in str(error(read_file, tmp_path / "bad.toml"))
    (tmp_path / "empty.yml").write_text("")
    assert read_file(tmp_path / "empty.yml") == {}


def test_torch_backend_fixes_the_glibc_mmap_threshold():
    """On glibc (this project's CI) the backend's memory setting takes effect; elsewhere it is a no-op. Run in
    a child process: it is process-wide and would slow the rest of the suite."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    code = "from onecomp.builtin.torch_backend import set_mmap_threshold; print(set_mmap_threshold(1))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.split() == ["True"]
