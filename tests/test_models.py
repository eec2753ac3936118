"""Model loading: every kind of source, and the errors for bad ones."""

import pytest

from onecomp import ModelLoadError
from onecomp.models import load_model


def test_hf_directory_loads(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    assert loaded.model.config.num_hidden_layers == 2 and loaded.tokenizer is not None
    assert loaded.model.config.use_cache is False and not loaded.model.training


def test_hub_id_unreachable_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the same failure as an unreachable hub, without the retries
    with pytest.raises(ModelLoadError, match="from the Hugging Face hub .*reachable"):
        load_model("no-such-org/no-such-model")


@pytest.mark.parametrize("source,message", [
    ("missing.gguf", "GGUF file .* does not exist"),
    ("./nowhere/at/all", "not found"),
])
def test_missing_sources(source, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(source)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="without config.json"):
        load_model(str(tmp_path))


def test_bad_dtype():
    with pytest.raises(ModelLoadError, match="dtype must be one of"):
        load_model("smollm2-135m", dtype="int8")


def test_checkpoint_directory_loads_through_load_model(tiny_model_dir, tmp_path):
    import onecomp

    out = tmp_path / "run"
    onecomp.run({"model": {"id": str(tiny_model_dir)},
                 "calibration": {"samples": 2, "seq_len": 32, "batch_size": 2},
                 "plan": {"quantizer": {"name": "rtn", "bits": 4, "group_size": 32}},
                 "evaluation": {"texts": ["kjv-gospels"], "windows": 1, "seq_len": 32, "before": False},
                 "output": {"dir": str(out)}}, progress=False)
    loaded = load_model(str(out / "01-layerwise"))
    from onecomp.checkpoint import quantized_modules

    assert len(quantized_modules(loaded.model)) == 14
