"""LoRDBA's properties (docs/algorithms.md, LoRDBA): packed forward = latent forward, size against fp16
LoRA, training lowers the loss, adapters saved apart and swapped, sign lock-in, task fine-tuning."""

import json

import pytest
import torch

import onecomp
from onecomp import ConfigError
from onecomp.checkpoint import QuantLinear
from onecomp.checkpoint.adapters import (Adapter, attach, attached, attach_adapters, detach, load_adapters,
                                         save_adapters)
from onecomp_lordba import LoRAFormat, LoRDBAConfig, LoRDBAFormat, binarize, pack_signs, unpack_signs
from onecomp_lordba.refiner import AdapterTraining


def factors(n=40, m=72, r=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, m, generator=g), torch.randn(n, r, generator=g)


@pytest.mark.parametrize("k", [1, 7, 8, 9, 17, 576])
def test_sign_packing_round_trips_and_holds_one_bit_per_sign(k):
    S = torch.where(torch.randn(3, k, generator=torch.Generator().manual_seed(k)) >= 0, 1, -1).to(torch.int8)
    packed = pack_signs(S)
    assert packed.dtype == torch.uint8 and packed.shape == (3, (k + 7) // 8)
    assert torch.equal(unpack_signs(packed, k), S)
    assert torch.equal(unpack_signs(packed, k, torch.float32), S.float())


def test_forward_is_two_sign_matmuls_with_channel_scales():
    """Δy = u_B ⊙ S_B((v_B ⊙ u_A) ⊙ S_A(v_A ⊙ x)), and it equals (B A) x."""
    fmt = LoRDBAFormat.from_dict({"rank": 8})
    f = fmt.from_factors(*factors())
    x = torch.randn(5, 72)
    want = f["u_B"].float() * ((f["v_B"].float() * f["u_A"].float() * ((f["v_A"].float() * x) @ f["S_A"].float().T))
                               @ f["S_B"].float().T)
    torch.testing.assert_close(fmt.delta(f, x), want)
    torch.testing.assert_close(fmt.delta(f, x), x @ fmt.dequantize_fields(f, (40, 72)).T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", [LoRDBAFormat.from_dict({"rank": 8}), LoRAFormat.from_dict({"rank": 8})])
def test_packed_forward_equals_latent_forward(fmt):
    A, B = factors()
    shape = (40, 72)
    layer = AdapterTraining(QuantLinear(fmt, shape, fmt.pack(fmt.from_factors(A, B), shape)))
    with torch.no_grad():
        for k in layer.params:  # move every trained tensor, latents included
            layer.params[k].add_(0.3 * torch.randn_like(layer.params[k]))
    x = torch.randn(2, 6, 72)
    latent = layer(x)
    packed = layer.commit_adapter()
    assert packed.stored()[next(iter(packed.stored()))].dtype in (torch.uint8, torch.float16)
    torch.testing.assert_close(packed(x), latent, rtol=1e-5, atol=1e-6)


def test_binarize_keeps_signs_and_fits_magnitudes():
    g = torch.Generator().manual_seed(1)
    M = torch.outer(torch.rand(30, generator=g) + 0.1, torch.rand(50, generator=g) + 0.1)
    M = M * torch.where(torch.rand(30, 50, generator=g) > 0.5, 1, -1)
    b = binarize(M)
    approx = b["u"][:, None] * b["S"].float() * b["v"]
    assert torch.equal(approx.sign(), M.sign())
    assert (M - approx).norm() < 1e-4 * M.norm()  # |M| is exactly rank one here


@pytest.mark.parametrize("n,m", [(576, 576), (1536, 576), (4096, 4096)])
def test_adapter_bytes_against_fp16_lora_of_the_same_rank(n, m):
    """Ratio 16r(n+m) / (r(n+m) + 16(n+m+2r)): 8× at r = 16 (the fp16 scales weigh as much as the signs),
    above 10× from r = 32 on."""
    g = torch.Generator().manual_seed(0)
    for r, low in ((16, 7.5), (32, 10.0), (64, 12.0)):
        lordba, lora = LoRDBAFormat.from_dict({"rank": r}), LoRAFormat.from_dict({"rank": r})
        a = sum(t.numel() * t.element_size() for t in lordba.pack(lordba.example((n, m), g), (n, m)).values())
        b = sum(t.numel() * t.element_size() for t in lora.pack(lora.example((n, m), g), (n, m)).values())
        assert b / a == pytest.approx(16 * r * (n + m) / (r * (n + m) + 16 * (n + m + 2 * r)))
        assert b / a > low


def test_config_is_validated_at_the_edge():
    for bad in ({"kind": "int4"}, {"rank": 0}, {"init": "zeros"}, {"seq_len": 1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            onecomp.build_config(LoRDBAConfig, bad, "refiners[0]")


def test_attach_detach_and_save_load_round_trip(tmp_path, tiny_llama):
    fmt = LoRDBAFormat.from_dict({"rank": 4})
    name = "model.layers.0.self_attn.q_proj"
    base = tiny_llama.get_submodule(name)
    A, B = factors(64, 64, 4)
    adapter = Adapter(fmt, (64, 64), fmt.pack(fmt.from_factors(A, B), (64, 64)))
    x = torch.randn(3, 64)
    plain = base(x)
    attach(tiny_llama, name, adapter)
    torch.testing.assert_close(base(x), plain + adapter(x))
    assert name + ".S_A_bits" not in tiny_llama.state_dict()  # the base's state dict is the base alone
    manifest = save_adapters({name: adapter}, tmp_path / "a", onecomp.Registry.default())
    assert manifest["bytes"] * 8 == fmt.expected_bits((64, 64))
    again = load_adapters(tmp_path / "a")
    torch.testing.assert_close(again[name](x), adapter(x))
    assert set(detach(tiny_llama)) == {name} and not attached(tiny_llama)
    torch.testing.assert_close(base(x), plain)
    (tmp_path / "a" / "adapter.safetensors").write_bytes(b"corrupt")
    with pytest.raises(onecomp.CheckpointError, match="corrupted"):
        load_adapters(tmp_path / "a")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_pipeline_stage_loads_with_its_adapters_and_swaps_them(tiny_dir, tmp_path, registry, run_config):
    """``onecomp run`` with the refiner: training lowers the KL, the stage checkpoint carries its adapters
    (listed and hashed), ``onecomp.load(stage)`` gives the same logits, and two adapters swap on one base."""
    out = tmp_path / "run"
    refiners = [{"name": "lordba", "rank": 4, "epochs": 3, "lr": 2e-2, "lr_discrete": 2e-2, "batch_size": 1, "samples": 2,
                 "regularizers": [{"name": "signlock", "strength": 1e-3}]}]
    result = onecomp.run(run_config(tiny_dir, out, refiners), registry=registry, progress=False)
    details = json.loads((out / "reports" / "02-lordba.json").read_text())["details"]
    assert details["loss_after"] < details["loss_before"] and details["loss_after"] < details["loss_pivot"]
    assert details["layers"] == details["attached"] == 14
    flip = details["regularizers"]["signlock"]
    assert flip["carriers"] == 2 * 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192)  # blocks × r × Σ (in + out)
    assert 0 <= flip["flip_rate"] <= 1 and flip["steps"] == 3 * 2
    stage, pivot = out / "02-lordba", out / "01-layerwise"
    manifest = json.loads((stage / "onecomp.json").read_text())
    assert {"adapters/lordba/adapter.json", "adapters/lordba/adapter.safetensors"} <= set(manifest["files"])
    ppl = result["stages"][-1]["ppl"]["kjv-gospels"]
    assert ppl < result["stages"][0]["ppl"]["kjv-gospels"]

    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    loaded = onecomp.load(stage, registry)
    assert len(attached(loaded)) == 14
    base_only = onecomp.load(stage, registry, adapters=[])
    assert not attached(base_only)
    torch.testing.assert_close(_logits(base_only, ids), _logits(onecomp.load(pivot, registry), ids))
    adapted = _logits(loaded, ids)
    torch.testing.assert_close(adapted, _logits(onecomp.load(stage, registry), ids))  # deterministic

    # a second adapter kind appended as a third stage (the run extends: no new pivot), then a hot swap
    fp16 = {**refiners[0], "kind": "fp16", "regularizers": []}
    onecomp.run(run_config(tiny_dir, out, [*refiners, fp16]), registry=registry, progress=False)
    third = out / "03-lordba"
    assert json.loads((out / "reports" / "03-lordba.json").read_text())["details"]["replaced"] == 14
    other = third / "adapters" / "lordba"
    on_pivot = onecomp.load(pivot, registry, adapters=[stage / "adapters" / "lordba"])
    torch.testing.assert_close(_logits(on_pivot, ids), adapted)
    detach(on_pivot)
    attach_adapters(on_pivot, None, [other], registry)
    swapped = _logits(on_pivot, ids)
    assert not torch.allclose(swapped, adapted)
    torch.testing.assert_close(swapped, _logits(onecomp.load(third, registry), ids))
    bytes_binary = json.loads((stage / "adapters/lordba/adapter.json").read_text())["bytes"]
    bytes_fp16 = json.loads((other / "adapter.json").read_text())["bytes"]
    assert bytes_binary < bytes_fp16


def test_task_fine_tuning_lowers_the_texts_perplexity(tiny_dir, tmp_path, registry, run_config):
    text = tmp_path / "task.txt"
    text.write_text("The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat. " * 40)
    cfg = {**run_config(tiny_dir, tmp_path / "run", [{"name": "lordba", "rank": 8, "epochs": 6, "lr": 0.1,
                                                       "lr_discrete": 0.1, "batch_size": 2, "samples": 2,
                                                       "seq_len": 64, "data": str(text)}]),
           "evaluation": {"texts": [str(text)], "windows": 4, "seq_len": 64}}
    result = onecomp.run(cfg, registry=registry, progress=False)
    before, after = (s["ppl"][str(text)] for s in result["stages"])
    details = json.loads((tmp_path / "run" / "reports" / "02-lordba.json").read_text())["details"]
    assert details["objective"].startswith("mean next-token loss")
    assert after < 0.9 * before, (before, after)


def test_residual_start_is_the_best_rank_r_correction_and_random_start_is_small():
    from onecomp_lordba.refiner import start_factors

    g = torch.Generator().manual_seed(3)
    W, W_hat = torch.randn(40, 72, generator=g), torch.randn(40, 72, generator=g)
    A, B = start_factors(W, W_hat, 6, "residual", g)
    S = torch.linalg.svdvals((W - W_hat).double())
    assert (W - W_hat - B @ A).double().square().sum().item() == pytest.approx(S[6:].square().sum().item(), rel=1e-4)
    torch.testing.assert_close(A.norm(dim=1), B.norm(dim=0))  # √Σ on both sides
    A, B = start_factors(None, W_hat, 6, "random", g)
    assert (B @ A).norm().item() == pytest.approx(0.01 * W_hat.norm().item(), rel=1e-4)


@pytest.mark.parametrize("kind", ["binary", "fp16"])
def test_compress_trains_adapters_on_a_model_object(tiny_llama, registry, kind):
    """``onecomp.compress``: no output directory, the adapters stay attached, training lowers the KL
    below the pivot's, and only the chosen layers get one."""
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    refiner = {"name": "lordba", "kind": kind, "rank": 4, "epochs": 4, "lr": 2e-2, "lr_discrete": 2e-2,
               "batch_size": 2, "layers": ["q_proj", "re:mlp\\.down"]}
    reports = onecomp.compress(tiny_llama, config={"plan": {"quantizer": {"name": "test-rowsign"}},
                                                   "refiners": [refiner]}, windows=windows, registry=registry)
    d = reports[-1].details
    assert d["loss_after"] < d["loss_before"] and d["loss_after"] < d["loss_pivot"]
    assert sorted(attached(tiny_llama)) == [f"model.layers.{b}.{n}" for b in (0, 1)
                                            for n in ("mlp.down_proj", "self_attn.q_proj")]
    fmt = {"binary": "lordba", "fp16": "lora"}[kind]
    assert {a.format.name for a in attached(tiny_llama).values()} == {fmt}
    assert d["adapter_bytes"] * 8 == sum(a.format.expected_bits(a.shape) for a in attached(tiny_llama).values())
