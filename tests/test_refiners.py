"""Builtin training refiners ``blockwise`` and ``global`` on a tiny model: they improve their
objective, never make it worse, know no format, call the regularizers, and resume."""

import json

import attrs
import pytest
import torch
from safetensors.torch import load_file

import onecomp
from onecomp import Compressed, Format, FormatError, Quantizer, Regularizer, hookimpl
from onecomp.builtin.refiners import Blockwise

RTN2 = {"name": "rtn", "bits": 2, "group_size": 32}


def config(model_dir, out, refiners, quantizer=RTN2):
    return {
        "model": {"id": str(model_dir)},
        "calibration": {"corpus": "kjv", "samples": 4, "seq_len": 64, "batch_size": 2},
        "plan": {"planner": "uniform", "quantizer": quantizer},
        "refiners": refiners,
        "evaluation": {"texts": ["kjv-gospels"], "windows": 2, "seq_len": 64},
        "output": {"dir": str(out)},
    }


def stored(path):
    return load_file(path / "model.safetensors")


def changed_tensors(a, b):
    return sorted(k for k in a if not torch.equal(a[k], b[k]))


def test_blockwise_then_global_improve_their_objectives(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = onecomp.run(config(tiny_model_dir, out, [
        {"name": "blockwise", "epochs": 3, "lr": 1e-2, "lr_discrete": 1e-2, "batch_size": 1},
        {"name": "global", "epochs": 2, "lr": 1e-2, "batch_size": 1}]), progress=False)
    names = [s["name"] for s in result["stages"]]
    assert names == ["layerwise", "blockwise", "global"]
    for i, name in enumerate(names, start=1):
        assert (out / f"{i:02d}-{name}" / "onecomp.json").exists()
    bw = json.loads((out / "reports" / "02-blockwise.json").read_text())["details"]
    assert len(bw["blocks"]) == 2
    for row in bw["blocks"]:
        assert row["loss_after"] <= row["loss_before"] and len(row["epochs"]) == 3
    assert bw["loss_after"] < 0.9 * bw["loss_before"]
    gl = json.loads((out / "reports" / "03-global.json").read_text())["details"]
    assert gl["loss_after"] < gl["loss_before"]
    # same format and bits at every stage: training tunes the stored values, not the layout
    bits = {s["bits"]["bits_per_weight"] for s in result["stages"]}
    assert len(bits) == 1
    manifests = [json.loads((out / f"{i:02d}-{n}" / "onecomp.json").read_text()) for i, n in enumerate(names, 1)]
    assert all({m["format"] for m in mf["modules"].values()} == {"gptq"} for mf in manifests)
    assert changed_tensors(stored(out / "01-layerwise"), stored(out / "02-blockwise"))
    # each checkpoint reloads with the perplexity its stage reported
    from transformers import AutoTokenizer

    from onecomp.evaluation import eval_windows, perplexity

    w = eval_windows(AutoTokenizer.from_pretrained(out / "03-global"), "kjv-gospels", 2, 64)
    assert perplexity(onecomp.load(out / "03-global", backend=None), w) == pytest.approx(
        result["stages"][2]["ppl"]["kjv-gospels"], rel=1e-4)


def test_a_bad_step_size_is_never_kept(tiny_model_dir, tmp_path):
    """With an absurd step size every epoch is worse; the stage keeps the starting point exactly."""
    out = tmp_path / "run"
    onecomp.run(config(tiny_model_dir, out, [{"name": "blockwise", "epochs": 2, "lr": 1.0, "lr_discrete": 1.0}]),
                progress=False)
    bw = json.loads((out / "reports" / "02-blockwise.json").read_text())["details"]
    for row in bw["blocks"]:
        assert row["loss_after"] <= row["loss_before"]
    kept = [r["block"] for r in bw["blocks"] if r["best_epoch"] == 0]
    assert kept, "expected lr=1 to make at least one block worse"
    changed = changed_tensors(stored(out / "01-layerwise"), stored(out / "02-blockwise"))
    assert not [k for k in changed for b in kept if f".layers.{b}." in k]


# ----------------------------------------------------------- a format the refiners have never seen


@attrs.define
class RowParams:
    pass


class RowInt3(Format):
    """Signed 3-bit codes in int8 with one fp16 scale per row, defined only in this test."""

    name = "test-rowint3"
    Config = RowParams
    trainable = ("scale",)
    discrete = {"codes": "integer"}

    def pack(self, fields, shape):
        if fields["codes"].is_floating_point():
            raise FormatError("codes must be integers")
        return {"codes": fields["codes"].to(torch.int8).contiguous(),
                "scale": fields["scale"].to(torch.float16).contiguous()}

    def unpack(self, stored, shape):
        return dict(stored)

    def dequantize_fields(self, fields, shape):
        return fields["scale"].float()[:, None] * fields["codes"].float()

    def snap(self, name, latent):
        return latent.round().clamp(-3, 3)

    def expected_bits(self, shape):
        return shape[0] * shape[1] * 8 + shape[0] * 16

    def example(self, shape, generator):
        return {"codes": torch.randint(-3, 4, shape, generator=generator).to(torch.int8),
                "scale": torch.rand(shape[0], generator=generator).to(torch.float16)}


class RowRTN(Quantizer):
    name = "test-rowrtn"

    def quantize(self, task):
        scale = task.W.abs().amax(1).clamp(min=1e-8) / 3
        codes = (task.W / scale[:, None]).round().clamp(-3, 3).to(torch.int8)
        fmt = RowInt3()
        return Compressed(fmt, fmt.pack({"codes": codes, "scale": scale}, task.W.shape),
                          tuple(task.W.shape))


class Recorder(Regularizer):
    """Records every call the refiner makes; its penalty carries a marker whose gradient counts
    the backward passes it took part in."""

    name = "test-recorder"
    targets = "integer"
    calls: list = []
    marker = torch.zeros((), requires_grad=True)

    def init(self, params):
        self.calls.append(("init", sorted(params)))

    def penalty(self, params):
        self.calls.append(("penalty", len(params)))
        return self.marker + 0 * sum(p.sum() for p in params.values())

    def step(self, params):
        self.calls.append(("step", len(params)))

    def finish(self, params):
        self.calls.append(("finish", sorted(params)))

    def report(self):
        return {"calls": len(self.calls)}


class TestComponents:
    @hookimpl
    def register_formats(self, register):
        register(RowInt3)

    @hookimpl
    def register_quantizers(self, register):
        register(RowRTN)

    @hookimpl
    def register_regularizers(self, register):
        register(Recorder)


@pytest.fixture
def registry():
    reg = onecomp.Registry()
    with reg.temporarily(TestComponents(), name="test-components"):
        yield reg
    Recorder.calls = []
    Recorder.marker.grad = None


def test_refiners_train_any_format_and_call_the_regularizers(tiny_model_dir, tmp_path, registry):
    out = tmp_path / "run"
    refiner = {"name": "blockwise", "epochs": 3, "lr": 1e-2, "lr_discrete": 0.15, "batch_size": 1,
               "regularizers": [{"name": "test-recorder"}]}
    onecomp.run(config(tiny_model_dir, out, [refiner], {"name": "test-rowrtn"}), registry=registry, progress=False)
    details = json.loads((out / "reports" / "02-blockwise.json").read_text())["details"]
    assert details["loss_after"] < details["loss_before"]
    changed = changed_tensors(stored(out / "01-layerwise"), stored(out / "02-blockwise"))
    assert any(k.endswith(".scale") for k in changed) and any(k.endswith(".codes") for k in changed)
    # one init/finish per block, with that block's integer latents only; penalty and step every step
    calls = Recorder.calls
    inits = [c[1] for c in calls if c[0] == "init"]
    assert len(inits) == 2 and all(k.endswith(".codes") for k in inits[0] + inits[1])
    assert all(".layers.0." in k for k in inits[0]) and all(".layers.1." in k for k in inits[1])
    assert len(inits[0]) == 7
    steps = sum(1 for c in calls if c[0] == "step")
    assert steps == sum(1 for c in calls if c[0] == "penalty") == 2 * 3 * 4  # blocks × epochs × windows
    assert [c[1] for c in calls if c[0] == "finish"] == inits
    assert Recorder.marker.grad == steps  # every penalty was part of the loss that was backpropagated
    assert details["regularizers"] == {"test-recorder": {"calls": len(calls)}}


def test_blockwise_resumes_after_a_crash(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    refiners = [{"name": "blockwise", "epochs": 1, "lr": 1e-2}]
    trained = []
    original = Blockwise._train_block

    def crash_on_block_1(self, b, *args, **kwargs):
        if b == 1:
            raise RuntimeError("simulated crash")
        trained.append(b)
        return original(self, b, *args, **kwargs)

    monkeypatch.setattr(Blockwise, "_train_block", crash_on_block_1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        onecomp.run(config(tiny_model_dir, out, refiners), progress=False)
    assert (out / ".work" / "02-blockwise" / "block-000.json").exists() and (out / "01-layerwise").exists()

    def count(self, b, *args, **kwargs):
        trained.append(b)
        return original(self, b, *args, **kwargs)

    monkeypatch.setattr(Blockwise, "_train_block", count)
    resumed = onecomp.run(config(tiny_model_dir, out, refiners), resume=True, progress=False)
    assert trained == [0, 1]  # block 0 once before the crash, block 1 once after
    fresh = onecomp.run(config(tiny_model_dir, tmp_path / "fresh", refiners), progress=False)
    assert resumed["stages"][1]["ppl"] == pytest.approx(fresh["stages"][1]["ppl"], rel=1e-5)


@pytest.mark.parametrize("bad, message", [
    ({"lr": -1}, "lr"), ({"epochs": 0}, "epochs"), ({"samples": -1}, "samples"), ({"batch_size": 0}, "batch_size"),
    ({"normalize": "l2"}, "normalize"), ({"code_steps": -1}, "code_steps")])
def test_bad_training_config_names_the_field(tiny_model_dir, tmp_path, bad, message):
    with pytest.raises(onecomp.ConfigError, match=rf"refiners\[0\]\.{message}"):
        onecomp.run(config(tiny_model_dir, tmp_path / "x", [{"name": "blockwise", **bad}]), progress=False)


def test_appending_a_refiner_runs_only_the_new_stage(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    onecomp.run(config(tiny_model_dir, out, []), progress=False)
    pivot = (out / "01-layerwise" / "onecomp.json").stat().st_mtime_ns
    import importlib

    import shutil

    copy = tmp_path / "copy"  # a copied pivot is a branch point: extending it works the same
    shutil.copytree(out, copy)
    monkeypatch.setattr(importlib.import_module("onecomp.pipeline.run"), "run_layerwise", lambda ctx: pytest.fail("the layer-wise stage ran again"))
    result = onecomp.run(config(tiny_model_dir, out, [{"name": "blockwise", "epochs": 1}]), progress=False)
    assert [s["name"] for s in result["stages"]] == ["layerwise", "blockwise"]
    assert (out / "01-layerwise" / "onecomp.json").stat().st_mtime_ns == pivot
    assert (out / "02-blockwise" / "onecomp.json").exists()
    branch = onecomp.run(config(tiny_model_dir, copy, [{"name": "blockwise", "epochs": 1, "lr": 1e-2}]),
                         progress=False)
    assert [s["name"] for s in branch["stages"]] == ["layerwise", "blockwise"]
    assert json.loads((copy / "run.json").read_text())["config"]["output"]["dir"] == str(copy)
    # changing anything else, or inserting a layer-scope refiner, is still a different run
    with pytest.raises(onecomp.OneCompError, match="different config"):
        onecomp.run(config(tiny_model_dir, out, [{"name": "qep"}, {"name": "blockwise", "epochs": 1}]),
                    progress=False)


class _Codes:
    """Stands in for an opened layer: one integer latent field."""

    def __init__(self, start):
        self.codes = torch.nn.Parameter(start.clone())

    def named_by_kind(self, prefix):
        return {"continuous": {}, "sign": {}, "integer": {f"{prefix}.codes": self.codes}}


def _fit_pushing_codes_up(**overrides):
    from onecomp.builtin.refiners import BlockwiseConfig
    from onecomp.training import Trainer

    start = torch.tensor([0.0, 3.0, 5.0])
    layer = _Codes(start)
    cfg = BlockwiseConfig(**{"lr_discrete": 0.5, "epochs": 3, **overrides})
    trainer = Trainer({"l": layer}, "", cfg, [])
    rates = []

    def loss(i):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        return -layer.codes.sum()

    # an objective that keeps falling, so the last state is the kept one
    trainer.fit(loss, 4, cfg.epochs, lambda: float(-layer.codes.detach().sum()), 0, lambda *a: None)
    return start, layer.codes.detach(), rates


def test_integer_latents_stay_within_code_steps_and_the_step_decays():
    start, end, rates = _fit_pushing_codes_up()
    assert torch.equal(end.round() - start, torch.ones(3))  # every code moved up exactly one step
    assert rates[0] == 0.5 and rates == sorted(rates, reverse=True) and rates[-1] == pytest.approx(0.5 / 12)
    start, far, _ = _fit_pushing_codes_up(code_steps=0, schedule="constant")
    assert (far.round() - start).min() >= 4  # unbounded, constant step: 12 steps of 0.5 codes
    start, two, _ = _fit_pushing_codes_up(code_steps=2)
    assert torch.equal(two.round() - start, torch.full((3,), 2.0))


def test_schedule_is_validated(tiny_model_dir, tmp_path):
    with pytest.raises(onecomp.ConfigError, match=r"refiners\[0\]\.schedule"):
        onecomp.run(config(tiny_model_dir, tmp_path / "x", [{"name": "blockwise", "schedule": "cosine"}]),
                    progress=False)



def test_block_objective_weights_tokens_as_configured():
    """"block" weighs the squared error to give ‖Ŷ − Y‖²/‖Y‖²; "token" gives the mean of each token's
    relative error, so one token with a 100× norm (an attention sink) dominates the first only."""
    from onecomp.training import token_weights

    Y = [torch.ones(2, 4, 8), torch.ones(1, 4, 8)]
    Y[0][0, 0] *= 100  # the sink token
    E = [torch.zeros_like(y) for y in Y]
    for e in E:
        e[..., 0] = 1.0  # every token off by 1 in one channel
    E[0][0, 0, 0] = 50.0  # the sink's error is large in absolute terms, small relative to its norm
    sq = torch.cat([y.square().sum(-1).flatten() for y in Y])
    err = torch.cat([e.square().sum(-1).flatten() for e in E])

    def objective(mode):
        return sum(float((e.square().sum(-1) * w).sum()) for e, w in zip(E, token_weights(Y, mode)))

    assert objective("block") == pytest.approx(float(err.sum() / sq.sum()), rel=1e-6)
    assert objective("token") == pytest.approx(float((err / sq).mean()), rel=1e-6)
    # ‖Ŷ − Y‖²/‖Y‖² is about the sink's own relative error (2500 / 80000) and hides the 12.5% of
    # every other token; the per-token mean sees them
    assert objective("block") == pytest.approx(2500 / 80000, rel=0.02)
    assert objective("token") > 3 * objective("block")
    # batches regrouped from the same windows (as training does) keep the weights of the whole
    for mode in ("block", "token"):
        chunks = [Y[0][:1], Y[0][1:], Y[1]]
        flat = torch.cat([w.flatten() for w in token_weights(chunks, mode, like=Y)])
        assert torch.allclose(flat, torch.cat([w.flatten() for w in token_weights(Y, mode)]))
