"""LPCD's properties (docs/algorithms.md, LPCD): one step on one layer is QEP, the submodule objective never
increases, any registered quantizer projects, and every submodule lowers its own objective on a tiny model."""

import pytest
import torch

import onecomp
from onecomp import Compressed, ConfigError, LayerTask, Quantizer, Registry, StageContext, hookimpl
from onecomp.calibration import StatsCollector
from onecomp.checkpoint import QuantLinear
from onecomp.models import inspect_model
from onecomp.testing.models import make_tiny_llama
from onecomp_lpcd import LPCD, LPCDConfig, closed_form_target, step_objective

WINDOWS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
RTN3 = {"name": "rtn", "bits": 3, "group_size": 32}
GPTQ3 = {"name": "gptq", "bits": 3, "group_size": 32, "mse": False}  # min-max grid: fast


def paths(n=3000, d=48, noise=0.3, seed=0):
    """fp-path inputs X and quantized-path inputs X̂ = X + correlated error."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) / d**0.5
    X_hat = X + noise * torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) / d**0.5
    return X, X_hat


def layer_statistics(X, X_hat, W, W0):
    """What the closed-form step accumulates for one layer whose output is the point (T = XWᵀ, P̂ = X̂Ŵ₀ᵀ)."""
    c = StatsCollector({"hessian", "cross"}, X.shape[1])
    c.add(X_hat, X)
    stats = c.finish()
    E = X @ W.T - X_hat @ W0.T
    scale = 2 / X.shape[0]
    return stats, scale * E.T @ X_hat, scale * float(E.double().square().sum())


@pytest.mark.parametrize("alpha", [0.5, 1.0, 0.25])
def test_one_step_on_one_layer_is_qep(alpha):
    """Same inputs and α: LPCD's corrected target equals QEP's (found by name), whatever the current Ŵ₀,
    and projecting both with gptq stores the same tensors."""
    X, X_hat = paths()
    g = torch.Generator().manual_seed(1)
    W = torch.randn(20, X.shape[1], generator=g)
    reg = Registry()
    qep = reg.create(reg.resolve("refiner", {"name": "qep", "alpha": alpha, "skip": []}))
    damp = LPCD().damping(X.shape[1], X.shape[0])
    for W0 in (W.round(), torch.zeros_like(W)):
        stats, G, _ = layer_statistics(X, X_hat, W, W0)
        ours = closed_form_target(W, W0, G, stats.H, alpha, damp)
        theirs = qep.adjust(LayerTask("l", W, stats)).W
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    gptq = reg.create(reg.resolve("quantizer", {"name": "gptq", "bits": 3, "group_size": 16}))
    a = gptq.quantize(LayerTask("l", ours, stats))
    b = gptq.quantize(LayerTask("l", theirs, stats))
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_objective_from_statistics_is_exact():
    X, X_hat = paths(n=500, d=24)
    g = torch.Generator().manual_seed(2)
    W, W0, D = (torch.randn(10, 24, generator=g) for _ in range(3))
    stats, G, s = layer_statistics(X, X_hat, W, W0)
    E = X @ W.T - X_hat @ W0.T
    direct = 2 / X.shape[0] * float((E - X_hat @ D.T).double().square().sum())
    assert step_objective(s, G, stats.H, D) == pytest.approx(direct, rel=1e-4)
    assert step_objective(s, G, stats.H, torch.zeros_like(D)) == pytest.approx(s)


def test_relaxed_target_lowers_the_residual_error():
    """With a residual error R (the part of the point the layer does not produce), α = 1 and no damping the
    relaxation is the least-squares fit of T − R̂ = X Wᵀ + (R − R̂)."""
    X, X_hat = paths()
    g = torch.Generator().manual_seed(3)
    W = torch.randn(20, X.shape[1], generator=g)
    R_err = 0.2 * torch.randn(X.shape[0], 20, generator=g)  # R − R̂, the residual stream's own error
    W0 = W.clone()
    c = StatsCollector({"hessian"}, X.shape[1])
    c.add(X_hat)
    H = c.finish().H
    E = X @ W.T + R_err - X_hat @ W0.T
    G = 2 / X.shape[0] * E.T @ X_hat
    W_star = closed_form_target(W, W0, G, H, alpha=1.0, percdamp=0.0)
    W_ls = torch.linalg.lstsq(X_hat.double(), (X @ W.T + R_err).double()).solution.T.float()
    assert torch.allclose(W_star, W_ls, atol=1e-3, rtol=1e-3)


def pivot(quantizer=RTN3, seed=0):
    model = make_tiny_llama(seed=seed)
    onecomp.compress(model, config={"plan": {"quantizer": quantizer}}, windows=WINDOWS)
    return model


def run_lpcd(model, registry=None, work_dir=None, seed=0, **config):
    """The lpcd stage alone on a pivot, with its fp teacher; its details."""
    registry = registry or Registry()
    spec = registry.resolve("refiner", {"name": "lpcd", **config}, "refiners[0]")
    ctx = StageContext(model, make_tiny_llama(seed=seed), inspect_model(model), WINDOWS, 2, registry, [], 0, False,
                       work_dir)
    return registry.create(spec).refine_block(ctx)


def weights(model):
    return {n: m.dequantize().clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("quantizer", [RTN3, GPTQ3])
def test_residual_default_with_gptq_and_rtn(quantizer, tmp_path):
    """The default submodule, projected with either quantizer: its objective falls, no step raises it,
    the bits do not change, and only o_proj and down_proj move."""
    model = pivot(quantizer)
    before = weights(model)
    bits = onecomp.checkpoint.bits_summary(model)["bits_per_weight"]
    details = run_lpcd(model, quantizer=quantizer, work_dir=tmp_path)
    steps = [s for b in details["blocks"] for s in b["steps"]]
    assert {s["layer"] for s in steps} == {"self_attn.o_proj", "mlp.down_proj"}
    assert all(s["after"] <= s["before"] for s in steps)
    assert details["loss_after"] < details["loss_before"]
    assert onecomp.checkpoint.bits_summary(model)["bits_per_weight"] == bits
    after = weights(model)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all(n.endswith(("o_proj", "down_proj")) for n in moved)


@pytest.mark.parametrize("submodule", ["qk", "updown", "vo"])
def test_each_submodule_lowers_its_own_objective(submodule, tmp_path):
    model = pivot(GPTQ3)
    details = run_lpcd(model, submodules=[submodule], quantizer=GPTQ3, gd_steps=8, lr=1e-3, work_dir=tmp_path)
    steps = [s for b in details["blocks"] for s in b["steps"]]
    assert steps and all(s["after"] <= s["before"] for s in steps)
    assert details["loss_after"] < details["loss_before"]
    if submodule != "vo":  # vo ends on o_proj's closed form
        assert {s["relax"] for s in steps if s["layer"] in ("self_attn.q_proj", "mlp.up_proj")} == {"gd"}


def test_gradient_relaxation_everywhere(tmp_path):
    details = run_lpcd(pivot(GPTQ3), relax="gd", quantizer=GPTQ3, gd_steps=8, lr=1e-3, work_dir=tmp_path)
    steps = [s for b in details["blocks"] for s in b["steps"]]
    assert {s["relax"] for s in steps} == {"gd"} and all(s["after"] <= s["before"] for s in steps)
    assert details["loss_after"] < details["loss_before"]


def test_steps_alternate_over_the_layers(tmp_path):
    details = run_lpcd(pivot(GPTQ3), submodules=["updown"], steps=2, quantizer=GPTQ3, gd_steps=3, work_dir=tmp_path)
    order = [(s["pass"], s["layer"]) for s in details["blocks"][0]["steps"]]
    assert order == [(0, "mlp.up_proj"), (0, "mlp.down_proj"), (1, "mlp.up_proj"), (1, "mlp.down_proj")]


class Plugin:
    """Quantizers defined here and found by name: ``dummy`` (one magnitude per row) and ``noisy`` (adds noise
    to every weight, so its projections should be refused)."""

    calls: list = []

    @hookimpl
    def register_quantizers(self, register):
        register(Dummy)
        register(Noisy)


def _dense(W, shape):
    return Compressed(Registry().get("format", "dense").from_dict({"dtype": "float32"}), {"weight": W.contiguous()},
                      shape)


class Dummy(Quantizer):
    name = "dummy"
    needs = frozenset({"hessian"})

    def quantize(self, task):
        Plugin.calls.append(task.name)
        return _dense(task.W.sign() * task.W.abs().mean(1, keepdim=True), task.shape)


class Noisy(Quantizer):
    name = "noisy"

    def quantize(self, task):
        g = torch.Generator().manual_seed(0)
        return _dense(task.W + torch.randn(task.W.shape, generator=g), task.shape)


def test_a_quantizer_found_by_name_projects(tmp_path):
    reg = Registry()
    with reg.temporarily(Plugin(), name="lpcd-test-quantizers"):
        model = make_tiny_llama(seed=0)
        Plugin.calls.clear()
        onecomp.compress(model, config={"plan": {"quantizer": {"name": "dummy"}}}, windows=WINDOWS, registry=reg)
        Plugin.calls.clear()
        details = run_lpcd(model, registry=reg, quantizer={"name": "dummy"}, work_dir=tmp_path)
    assert sorted(Plugin.calls) == sorted(f"model.layers.{b}.{n}" for b in range(2)
                                          for n in ("self_attn.o_proj", "mlp.down_proj"))
    assert details["quantizer"] == {"name": "dummy"}
    assert details["loss_after"] <= details["loss_before"]


def test_a_worse_projection_is_refused(tmp_path):
    """A projection that raises the objective is not accepted: the layer keeps its weights."""
    reg = Registry()
    with reg.temporarily(Plugin(), name="lpcd-test-quantizers"):
        model = make_tiny_llama(seed=0)
        onecomp.compress(model, config={"plan": {"quantizer": {"name": "dummy"}}}, windows=WINDOWS, registry=reg)
        before = weights(model)
        details = run_lpcd(model, registry=reg, submodules=["residual", "qk"], quantizer={"name": "noisy"},
                           gd_steps=2, work_dir=tmp_path)
    steps = [s for b in details["blocks"] for s in b["steps"]]
    assert steps and not any(s["accepted"] for s in steps)
    assert all(s["projected"] > s["before"] == s["after"] for s in steps)
    after = weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_resume_reapplies_saved_blocks(tmp_path):
    first = pivot(GPTQ3)
    details = run_lpcd(first, quantizer=GPTQ3, work_dir=tmp_path)
    second = pivot(GPTQ3)
    again = run_lpcd(second, quantizer=GPTQ3, work_dir=tmp_path)  # every block is on disk: nothing recomputed
    assert again["blocks"] == details["blocks"]
    a, b = weights(first), weights(second)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_composes_with_qep_in_one_pipeline():
    """QEP corrects the layers in the layer-wise stage, then LPCD re-projects o_proj and down_proj
    (keeping QEP's result wherever its own projection is not better)."""
    model = make_tiny_llama(seed=0)
    reports = onecomp.compress(model, config={"plan": {"quantizer": GPTQ3},
                                              "refiners": [{"name": "qep"}, {"name": "lpcd", "quantizer": GPTQ3}]},
                               windows=WINDOWS)
    assert [r.name for r in reports] == ["layerwise", "lpcd"]
    assert reports[1].details["loss_after"] <= reports[1].details["loss_before"]
    qep_only = make_tiny_llama(seed=0)
    onecomp.compress(qep_only, config={"plan": {"quantizer": GPTQ3}, "refiners": [{"name": "qep"}]}, windows=WINDOWS)
    ours, theirs = weights(model), weights(qep_only)
    kept = [n for n in ours if not n.endswith(("o_proj", "down_proj"))]
    assert kept and all(torch.equal(ours[n], theirs[n]) for n in kept)  # QEP's layers where LPCD does not reach


def test_more_bits_than_the_pivot_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"refiners\.lpcd\.quantizer: rtn stores .* more than"):
        run_lpcd(pivot(RTN3), quantizer={"name": "rtn", "bits": 4, "group_size": 32}, work_dir=tmp_path)


def test_config_is_validated():
    reg = Registry()
    with pytest.raises(ConfigError, match=r"refiners\[0\].*unknown submodule 'mlp'; allowed: residual, qk, vo, updown"):
        reg.resolve("refiner", {"name": "lpcd", "submodules": ["mlp"]}, "refiners[0]")
    with pytest.raises(ConfigError, match=r"refiners\[0\].*quantizer: must be a table naming a registered quantizer"):
        reg.resolve("refiner", {"name": "lpcd", "quantizer": "gptq"}, "refiners[0]")
    with pytest.raises(ConfigError, match=r"refiners\[0\].alpha: must be in \[0, 1\]"):
        reg.resolve("refiner", {"name": "lpcd", "alpha": 2.0}, "refiners[0]")
    with pytest.raises(ConfigError, match=r"refiners\[0\].relax"):
        reg.resolve("refiner", {"name": "lpcd", "relax": "newton"}, "refiners[0]")
    with pytest.raises(ConfigError, match=r"refiners\.lpcd\.quantizer\.bits: must be in \[1, 8\]"):
        run_lpcd(make_tiny_llama(seed=0), quantizer={"name": "gptq", "bits": 12})  # checked before any block
    assert LPCDConfig().submodules == ["residual"] and LPCDConfig().alpha == 0.5
    lpcd = LPCD(LPCDConfig(submodules=["residual", "qk", "updown"]))
    assert [p[0] for p in lpcd.problems()] == ["qk:attn", "residual:mid", "residual:out", "updown:out"]


def test_skipped_layers_keep_the_pivots_weights(tmp_path):
    model = pivot(GPTQ3)
    before = weights(model)
    details = run_lpcd(model, quantizer=GPTQ3, skip=["mlp.down_proj"], work_dir=tmp_path)
    steps = [s for b in details["blocks"] for s in b["steps"]]
    assert steps and {s["layer"] for s in steps} == {"self_attn.o_proj"}
    after = weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before if n.endswith("down_proj"))
    assert any(not torch.equal(before[n], after[n]) for n in before if n.endswith("o_proj"))


def test_rms_token_weights_measure_the_error_as_the_next_norm_reads_it():
    """Σ_t r_t ‖T_t − P_t‖² with r_t = 1/mean(T_t²) is the squared error of the RMS-normalised vectors
    (to first order), so it does not change when one token's residual vector is scaled."""
    from onecomp_lpcd.lpcd import token_weights

    g = torch.Generator().manual_seed(0)
    T = torch.randn(2, 5, 16, generator=g)
    P = T + 0.01 * torch.randn(2, 5, 16, generator=g)
    err = ((T - P).square() * token_weights(T)).sum()
    rms = T.square().mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(err, ((T / rms - P / rms).square()).sum(), rtol=1e-4, atol=1e-6)
    scale = torch.ones(2, 5, 1)
    scale[0, 3] = 1000.0  # one token with a massive residual vector
    err_scaled = ((T * scale - P * scale).square() * token_weights(T * scale)).sum()
    torch.testing.assert_close(err_scaled, err, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("relax", ["closed_form", "gd"])
def test_rms_weighted_steps_never_raise_their_objective(relax, tmp_path):
    model = pivot(GPTQ3)
    details = run_lpcd(model, quantizer=GPTQ3, token_weights="rms", relax=relax, gd_steps=8, lr=1e-3,
                       work_dir=tmp_path)
    steps = [s for b in details["blocks"] for s in b["steps"]]
    assert steps and all(s["after"] <= s["before"] for s in steps)
    assert details["loss_after"] < details["loss_before"]
    plain = run_lpcd(pivot(GPTQ3), quantizer=GPTQ3, token_weights="none", relax=relax, gd_steps=8, lr=1e-3,
                     work_dir=tmp_path / "plain")
    assert details["loss_before"] != pytest.approx(plain["loss_before"])  # a different objective is measured
