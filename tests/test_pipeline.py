"""The pipeline end to end on a tiny model: stages, checkpoints, reports, resume, config errors."""

import json

import pytest
import torch

import onecomp
from onecomp import ConfigError, hookimpl
from onecomp.cli import main as cli


def config(model_dir, out, quantizer=None, refiners=(), **extra):
    return {
        "model": {"id": str(model_dir)},
        "calibration": {"corpus": "kjv", "samples": 4, "seq_len": 64, "batch_size": 2},
        "plan": {"planner": "uniform", "quantizer": quantizer or {"name": "gptq", "bits": 4, "group_size": 32}},
        "refiners": list(refiners),
        "evaluation": {"texts": ["kjv-gospels"], "windows": 2, "seq_len": 64},
        "output": {"dir": str(out)},
        **extra,
    }


def test_run_writes_pivot_checkpoint_and_reports(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = onecomp.run(config(tiny_model_dir, out), progress=False)
    stage = result["stages"][0]
    assert stage["name"] == "layerwise" and stage["index"] == 1
    ckpt = out / "01-layerwise"
    manifest = json.loads((ckpt / "onecomp.json").read_text())
    assert len(manifest["modules"]) == 14 and {m["format"] for m in manifest["modules"].values()} == {"gptq"}
    assert manifest["modules"]["model.layers.0.self_attn.q_proj"]["dist"] == "onecomp-gptq"
    assert set(manifest["files"]) >= {"model.safetensors", "config.json"}
    assert (out / "reports" / "01-layerwise.json").exists() and (out / "report.md").exists()
    assert not (out / ".work").exists()
    # exact bits: 4-bit codes, fp16 scale + 4-bit zero per 32 columns, int16 g_idx per input column
    shapes = [m["shape"] for m in manifest["modules"].values()]
    bits = sum(o * i * (4 + (16 + 4) / 32) + 16 * i for o, i in shapes)
    assert stage["bits"]["bits_per_weight"] == pytest.approx(bits / sum(o * i for o, i in shapes), rel=1e-12)
    # the checkpoint reloads as a model with the same perplexity
    model = onecomp.load(ckpt, backend=None)  # the reference path the stage evaluated
    from onecomp.evaluation import eval_windows, perplexity
    from transformers import AutoTokenizer

    w = eval_windows(AutoTokenizer.from_pretrained(ckpt), "kjv-gospels", 2, 64)
    assert perplexity(model, w) == pytest.approx(stage["ppl"]["kjv-gospels"], rel=1e-4)


def test_rerun_same_config_skips_finished_stages(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    onecomp.run(config(tiny_model_dir, out), progress=False)
    before = (out / "01-layerwise" / "onecomp.json").stat().st_mtime_ns
    onecomp.run(config(tiny_model_dir, out), progress=False)
    assert (out / "01-layerwise" / "onecomp.json").stat().st_mtime_ns == before
    with pytest.raises(onecomp.OneCompError, match="different config"):
        onecomp.run(config(tiny_model_dir, out, quantizer={"name": "rtn", "bits": 3}), progress=False)


def test_crash_mid_stage_resumes_from_the_last_block(tiny_model_dir, tmp_path):
    """A crash after block 0 keeps block 0 on disk; the resumed run quantizes only block 1."""
    out = tmp_path / "run"
    registry = onecomp.Registry()

    class Crash:
        @hookimpl
        def on_block_done(self, run, block):
            if block.index == 0:
                raise RuntimeError("simulated crash")

    with registry.temporarily(Crash(), name="crash"):
        with pytest.raises(RuntimeError, match="simulated crash"):
            onecomp.run(config(tiny_model_dir, out), registry=registry, progress=False)
    assert (out / ".work" / "01-layerwise" / "block-000.json").exists()
    assert not (out / "01-layerwise").exists()

    quantized = []

    class Count:
        @hookimpl
        def on_layer_quantized(self, run, layer):
            quantized.append(layer.name)

    with registry.temporarily(Count(), name="count"):
        resumed = onecomp.run(config(tiny_model_dir, out), registry=registry, resume=True, progress=False)
    assert quantized and all(".layers.1." in n for n in quantized)
    fresh = onecomp.run(config(tiny_model_dir, tmp_path / "fresh"), registry=registry, progress=False)
    assert resumed["stages"][0]["ppl"] == pytest.approx(fresh["stages"][0]["ppl"], rel=1e-5)


def test_bad_config_fails_before_any_work(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nid = "does-not-matter"\n[plan]\nquantizer = { name = "gptq", bits = 11 }\n'
                   '[output]\ndir = "%s"\n' % (tmp_path / "never"))
    assert cli(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "plan.quantizer.bits: must be in [1, 8], got 11" in err
    assert not (tmp_path / "never").exists()
    with pytest.raises(ConfigError, match=r"refiners\[0\].name: no refiner named 'blockwize'"):
        onecomp.run(config(tiny_model_dir, tmp_path / "x", refiners=[{"name": "blockwize"}]), progress=False)


def test_rtn_needs_no_calibration_pass(tiny_model_dir, tmp_path, monkeypatch):
    import onecomp.pipeline.layerwise as lw

    def boom(*a, **k):
        raise AssertionError("RTN must not run calibration forward passes")

    monkeypatch.setattr(lw, "first_block_inputs", boom)
    result = onecomp.run(config(tiny_model_dir, tmp_path / "rtn", quantizer={"name": "rtn", "bits": 4,
                                                                             "group_size": 32}), progress=False)
    assert result["stages"][0]["bits"]["bits_per_weight"] > 4


def test_gptq_qep_pipeline_runs_and_qep_sees_two_paths(tiny_model_dir, tmp_path):
    out = tmp_path / "qep"
    result = onecomp.run(config(tiny_model_dir, out, quantizer={"name": "gptq", "bits": 3, "group_size": 32},
                                refiners=[{"name": "qep", "alpha": 0.5}]), progress=False)
    assert torch.isfinite(torch.tensor(result["stages"][0]["ppl"]["kjv-gospels"]))
    assert json.loads((out / "01-layerwise" / "onecomp.json").read_text())["config"]["refiners"][0]["name"] == "qep"


def _layerwise(model, registry, tmp_path, windows, sequential="layer", refiners=()):
    from onecomp.models import inspect_model
    from onecomp.pipeline.layerwise import LayerwiseContext, run_layerwise

    insp = inspect_model(model)
    spec = registry.resolve("quantizer", {"name": "gptq", "bits": 4, "group_size": 32}, "plan.quantizer")
    planner = registry.create(registry.resolve("planner", "uniform", "plan.planner"))
    plan = planner.plan(insp, spec, registry)
    layer_refiners = [registry.create(registry.resolve("refiner", r, "refiners")) for r in refiners]
    run_layerwise(LayerwiseContext(model, insp, plan, layer_refiners, registry, windows, 2, tmp_path / "work",
                                   progress=False, sequential=sequential))
    return plan


def test_layerwise_caches_the_dequantized_weight_in_the_replaced_weights_memory(tiny_llama, registry, tmp_path,
                                                                                 calib_batch):
    """No second copy of the linear layers: each QuantLinear's cache is the old weight's storage, holding Ŵ."""
    from onecomp.checkpoint import QuantLinear

    model = tiny_llama
    before = {n: m.weight.untyped_storage().data_ptr() for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    plan = _layerwise(model, registry, tmp_path, calib_batch)
    assert set(plan) <= set(before) and plan
    for name in plan:
        q = model.get_submodule(name)
        assert isinstance(q, QuantLinear)
        assert q._cache.untyped_storage().data_ptr() == before[name]
        assert torch.equal(q._cache, q.dequantize())


def test_layerwise_never_overwrites_a_weight_another_module_shares(tiny_llama, registry, tmp_path, calib_batch):
    """Tied weights: block 0's q_proj shares block 1's; quantizing block 0 must leave block 1's values intact."""
    model = tiny_llama
    blocks = model.model.layers
    blocks[1].self_attn.q_proj.weight = blocks[0].self_attn.q_proj.weight
    original = blocks[0].self_attn.q_proj.weight.detach().clone()
    seen = {}
    real = blocks[1].self_attn.q_proj.forward

    def spy(x):
        seen.setdefault("w", blocks[1].self_attn.q_proj.weight.detach().clone())
        return real(x)

    blocks[1].self_attn.q_proj.forward = spy
    _layerwise(model, registry, tmp_path, calib_batch)
    assert torch.equal(seen["w"], original)  # block 1 saw the fp weight while block 0 was already quantized
    q0 = blocks[0].self_attn.q_proj
    assert q0._cache.untyped_storage().data_ptr() != original.untyped_storage().data_ptr()
    assert torch.equal(q0._cache, q0.dequantize())


@pytest.mark.parametrize("sequential", ["layer", "block"])
def test_layerwise_does_not_propagate_past_the_last_block(tiny_llama, registry, tmp_path, calib_batch, monkeypatch,
                                                          sequential):
    """Block mode propagates after each block but the last; layer mode gets the outputs from its own stages
    (SequentialCapture.finish), also for every block but the last, and never runs a separate pass."""
    import onecomp.pipeline.layerwise as lw

    calls = {"propagate": [], "finish": []}
    real, real_finish = lw.propagate_, lw.SequentialCapture.finish
    monkeypatch.setattr(lw, "propagate_", lambda block, inputs: calls["propagate"].append(block) or real(block, inputs))
    monkeypatch.setattr(lw.SequentialCapture, "finish", lambda self: calls["finish"].append(self.block)
                        or real_finish(self))
    _layerwise(tiny_llama, registry, tmp_path, calib_batch, sequential)
    blocks = list(tiny_llama.model.layers)
    assert calls == ({"propagate": [], "finish": blocks[:-1]} if sequential == "layer"
                     else {"propagate": blocks[:-1], "finish": []})


def test_layer_mode_with_qep_runs_both_paths_in_stages(tiny_llama, registry, tmp_path, calib_batch, monkeypatch):
    """QEP's ``cross`` needs the fp path: layer mode advances it stage by stage on an fp copy of each block, so
    no block-by-block statistics pass and no propagation run, and every block but the last finishes both paths."""
    import onecomp.pipeline.layerwise as lw

    calls = {"propagate": 0, "capture_block": 0, "finish": 0, "fixed": 0}
    real_finish = lw.SequentialCapture.finish
    monkeypatch.setattr(lw, "propagate_", lambda *a: calls.__setitem__("propagate", calls["propagate"] + 1))
    monkeypatch.setattr(lw, "capture_block", lambda *a: calls.__setitem__("capture_block", calls["capture_block"] + 1))

    def finish(self):
        calls["finish"] += 1
        calls["fixed"] += self.fixed
        return real_finish(self)

    monkeypatch.setattr(lw.SequentialCapture, "finish", finish)
    _layerwise(tiny_llama, registry, tmp_path, calib_batch, "layer", refiners=[{"name": "qep"}])
    n = len(tiny_llama.model.layers)
    assert calls == {"propagate": 0, "capture_block": 0, "finish": 2 * (n - 1), "fixed": n - 1}


def test_layer_and_block_calibration_agree_on_block_0_q_k_v(tiny_llama, registry, tmp_path, calib_batch):
    """Both modes calibrate q/k/v of the first block on the same inputs (the modes differ from o_proj on)."""
    import copy

    other = copy.deepcopy(tiny_llama)
    _layerwise(tiny_llama, registry, tmp_path / "a", calib_batch, "layer")
    _layerwise(other, registry, tmp_path / "b", calib_batch, "block")
    for name in ("q_proj", "k_proj", "v_proj"):
        a, b = (m.model.layers[0].self_attn.get_submodule(name) for m in (tiny_llama, other))
        assert torch.equal(a.dequantize(), b.dequantize())
    assert not torch.equal(tiny_llama.model.layers[0].mlp.down_proj.dequantize(),
                           other.model.layers[0].mlp.down_proj.dequantize())


def test_compress_runs_the_stages_on_a_model_object(tiny_llama):
    """onecomp.compress quantizes a model in place, with the same plan and stages as run(), and the
    hooks see one StageInfo type under ``stage`` at start and end."""
    from onecomp import Registry, StageInfo, StageReport
    from onecomp.checkpoint import quantized_modules

    seen = []

    class Observer:
        @hookimpl
        def on_stage_start(self, run, stage):
            seen.append(("start", type(stage)))

        @hookimpl
        def on_stage_end(self, run, stage, report):
            seen.append(("end", type(stage), type(report)))

    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    reg = Registry()
    with reg.temporarily(Observer(), name="observer"):
        reports = onecomp.compress(tiny_llama, config={
            "plan": {"quantizer": {"name": "rtn", "bits": 4, "group_size": 32}},
            "refiners": [{"name": "blockwise", "epochs": 1}]}, windows=windows, registry=reg)
    assert [r.name for r in reports] == ["layerwise", "blockwise"]
    assert len(quantized_modules(tiny_llama)) == 14
    assert reports[1].details["loss_after"] <= reports[1].details["loss_before"]
    assert seen == [("start", StageInfo), ("end", StageInfo, StageReport)] * 2


def test_compress_needs_a_tokenizer_or_windows(tiny_llama):
    with pytest.raises(onecomp.RunError, match="tokenizer"):
        onecomp.compress(tiny_llama, config={"plan": {"quantizer": {"name": "rtn"}}})


def test_inspect_and_version_on_the_command_line(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    onecomp.run(config(tiny_model_dir, out, quantizer={"name": "rtn", "bits": 4, "group_size": 32},
                       evaluation={"texts": ["kjv-gospels"], "windows": 1, "seq_len": 32, "before": False}),
                progress=False)
    capsys.readouterr()
    assert cli(["inspect", str(out / "01-layerwise")]) == 0
    text = capsys.readouterr().out
    assert "blocks: 2" in text and "quantized: 14 layers in format gptq" in text
    with pytest.raises(SystemExit) as info:
        cli(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"onecomp {onecomp.__version__}"
