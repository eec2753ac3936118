"""The autobit planner on a tiny random Llama: budgets hold on the stored bytes, fused groups share
one choice, infeasible budgets name the smallest feasible one, the allocation report."""

import pytest
import torch
from safetensors.torch import load_file

import onecomp
from onecomp import BackendCapabilities, ConfigError
from onecomp.checkpoint import bits_summary, save_checkpoint
from onecomp.config import load_config
from onecomp.models import inspect_model
from onecomp.pipeline.run import make_plan
from onecomp.testing import PluginSuite

pytest.importorskip("onecomp_gptq")

CANDIDATES = [{"name": "gptq", "bits": b, "group_size": g, "mse": False} for b in (2, 3, 4, 8) for g in (32, -1)]
W3 = {"name": "gptq", "bits": 3, "group_size": 32, "mse": False}


class TestAutoBitPlugin(PluginSuite):
    distribution = "onecomp-autobit"
    names = {"planner": ["autobit"]}


def planned(model, windows, planner, quantizer=None, **given):
    """The plan, the planner instance and the inspection for ``[plan]`` tables."""
    reg = onecomp.Registry.default()
    cfg = load_config({"plan": {"planner": {"name": "autobit", "candidates": CANDIDATES, **planner},
                                **({"quantizer": quantizer} if quantizer else {})}}, reg)
    p = reg.create(cfg.planner)
    inspection = inspect_model(model)
    if given:
        return p.plan(inspection, cfg.quantizer, reg, model=model, **given), p, inspection
    return make_plan(p, inspection, cfg, reg, model, windows), p, inspection


def test_budget_holds_exactly_on_the_stored_checkpoint(tiny_llama, calib_batch, tmp_path):
    """The plan's bits are what the checkpoint stores, and they stay within the uniform plan's."""
    config = {"plan": {"planner": {"name": "autobit", "candidates": CANDIDATES}, "quantizer": W3}}
    _, planner, _ = planned(tiny_llama, calib_batch, {}, W3)
    reports = onecomp.compress(tiny_llama, config=config, windows=calib_batch)
    summary = planner.summary
    reg = onecomp.Registry.default()
    save_checkpoint(tiny_llama, None, tmp_path / "ckpt", reg, base_model="tiny", config=config, stages=[])
    stored = load_file(tmp_path / "ckpt" / "model.safetensors")
    layers = set(summary["layers"])
    weight_bits = sum(8 * t.numel() * t.element_size() for k, t in stored.items()
                      if k.rsplit(".", 1)[0] in layers and not k.endswith(".bias"))
    assert weight_bits == summary["planned_bits"] == reports[0].bits["quantized_bits"]
    assert weight_bits <= summary["budget_bits"]
    uniform = sum(reg.create(reg.resolve("quantizer", W3)).format_for(tuple(m.weight.shape)).expected_bits(
        tuple(m.weight.shape)) for n, m in inspect_plan_modules(tiny_llama, layers))
    assert summary["budget_bits"] == uniform
    assert len(summary["chosen"]) > 1  # the tiny model's layers differ enough to mix precisions


def inspect_plan_modules(model, names):
    from onecomp.testing.models import make_tiny_llama

    fresh = make_tiny_llama(seed=0)
    return [(n, fresh.get_submodule(n)) for n in names]


def test_target_bpw_and_cost_order(tiny_llama, calib_batch):
    """Bits stay within target_bpw; the plan's total cost is at most the uniform candidate's."""
    plan, p, inspection = planned(tiny_llama, calib_batch, {"target_bpw": 3.3})
    s = p.summary
    assert s["planned_bits"] <= 3.3 * s["weights"] and s["budget_source"].startswith("target_bpw")
    plan_w3, p_w3, _ = planned(tiny_llama, calib_batch, {}, W3)
    plan_more, p_more, _ = planned(tiny_llama, calib_batch, {"target_bpw": 5.0})
    assert p_more.summary["total_cost"] <= p.summary["total_cost"] * (1 + 1e-6)
    # the uniform w3g32 choice is a candidate at the w3g32 budget, so AutoBit can only cost less
    reg = onecomp.Registry.default()
    from onecomp_autobit.costs import layer_cost, statistics_for
    from onecomp.pipeline.run import planner_stats

    stats = planner_stats(tiny_llama, inspection, calib_batch, 8, {"diag"})
    q = reg.create(reg.resolve("quantizer", W3))
    uniform_cost = sum(layer_cost(q, n, tiny_llama.get_submodule(n).weight.detach().float(),
                                  statistics_for(q, stats[n].diag), stats[n].diag) for n in plan_w3)
    assert p_w3.summary["total_cost"] <= uniform_cost * (1 + 1e-6)


def test_fused_groups_get_one_choice(tiny_llama, calib_batch):
    plan, _, inspection = planned(tiny_llama, calib_batch, {"target_bpw": 3.0})
    for b in inspection.blocks:
        for group in b.groups:
            assert len({str(plan[f"{b.prefix}.{rel}"].to_dict()) for rel in group}) == 1, group


def test_infeasible_budget_names_the_smallest_feasible(tiny_llama, calib_batch):
    with pytest.raises(ConfigError) as info:
        planned(tiny_llama, calib_batch, {"target_bpw": 1.0, "cost": "rtn"})
    msg = str(info.value)
    assert info.value.path == "plan.planner.target_bpw" and "smallest feasible" in msg
    _, p, _ = planned(tiny_llama, calib_batch, {"target_bpw": 3.0, "cost": "rtn"})
    smallest = p.summary["smallest_feasible_bits"] / p.summary["weights"]
    assert f"{smallest:.4f} bits per weight" in msg


def test_auto_budget_fits_the_backend_memory(tiny_llama, calib_batch):
    from onecomp_autobit.planner import dense_bytes

    free = 200_000
    plan, p, _ = planned(tiny_llama, calib_batch, {"budget": "auto", "headroom": 0.2, "cost": "rtn"},
                         capabilities=BackendCapabilities("fake", "cpu", free_memory=free))
    assert dense_bytes(tiny_llama, plan) + p.summary["planned_bits"] / 8 <= 0.8 * free
    assert p.needs == {"model", "capabilities"}
    with pytest.raises(ConfigError, match="reports no free memory"):
        planned(tiny_llama, calib_batch, {"budget": "auto", "cost": "rtn"},
                capabilities=BackendCapabilities("fake", "cpu"))


def test_max_bytes_bounds_the_stored_model(tiny_llama, calib_batch):
    limit = 160_000
    config = {"plan": {"planner": {"name": "autobit", "candidates": CANDIDATES, "max_bytes": limit, "cost": "rtn"}}}
    reports = onecomp.compress(tiny_llama, config=config, windows=calib_batch)
    assert reports[0].bits["model_bytes"] <= limit
    assert bits_summary(tiny_llama)["model_bytes"] <= limit


def test_one_budget_only_and_a_budget_is_needed(tiny_llama, calib_batch):
    reg = onecomp.Registry.default()
    with pytest.raises(ConfigError, match="one budget"):
        load_config({"plan": {"planner": {"name": "autobit", "target_bpw": 3.0, "max_bytes": 10}}}, reg)
    with pytest.raises(ConfigError, match="needs a budget"):
        planned(tiny_llama, calib_batch, {"cost": "rtn"})


def test_gptq_estimate_equals_gptq_with_a_diagonal_hessian():
    """What AutoBit prices GPTQ with is GPTQ's own result when H is diagonal."""
    from onecomp import LayerStats, LayerTask

    reg = onecomp.Registry.default()
    g = torch.Generator().manual_seed(1)
    W, d = torch.randn(24, 80, generator=g), torch.rand(80, generator=g)
    d[5] = 0
    for cfg in ({"bits": 3, "group_size": 16, "mse": False}, {"bits": 2, "group_size": -1},
                {"bits": 4, "group_size": 32, "act_order": False}):
        q = reg.create(reg.resolve("quantizer", {"name": "gptq", **cfg}))
        task = LayerTask("x", W, LayerStats(H=torch.diag(2 * d), diag=d))
        c = q.quantize(task)
        assert torch.equal(q.estimate(task), c.format.dequantize(c.tensors, c.shape))
        assert c.format.to_dict() == q.format_for(c.shape).to_dict()


def test_allocation_table_and_png(tmp_path):
    from onecomp_autobit import allocation

    bpw = {"model.layers.0.self_attn.q_proj": 3.2, "model.layers.0.mlp.down_proj": 4.1,
           "model.layers.1.self_attn.q_proj": 2.3}
    md = allocation.markdown(bpw)
    assert "| block | q_proj | down_proj |" in md and "| 1 | 2.30 | – |" in md
    pytest.importorskip("matplotlib")
    path = allocation.png(bpw, tmp_path / "a.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_stage_report_gets_the_allocation(tmp_path):
    """After an autobit run's layer-wise stage: the table in the stage's markdown, the PNG beside it;
    other planners' runs are left alone."""
    from onecomp import RunInfo, StageInfo, StageReport
    from onecomp_autobit import plugin

    layers = [{"name": f"model.layers.{b}.{k}", "bits_per_weight": 2.0 + b} for b in range(2)
              for k in ("self_attn.q_proj", "mlp.down_proj")]
    for planner, touched in (("uniform", False), ({"name": "autobit"}, True)):
        (tmp_path / "reports").mkdir(exist_ok=True)
        md = tmp_path / "reports" / "01-layerwise.md"
        md.write_text("# Stage 1\n")
        report = StageReport("layerwise", 1, "layer", "", {}, {"bits_per_weight": 2.5}, 1.0, 1.0, {"layers": layers})
        plugin.on_stage_end(run=RunInfo({"plan": {"planner": planner}}, tmp_path, "tiny"),
                            stage=StageInfo("layerwise", "layer", 1), report=report)
        assert ("| 1 | 3.00 | 3.00 |" in md.read_text()) == touched
        assert (tmp_path / "reports" / "01-layerwise-allocation.png").exists() == touched


@pytest.mark.parametrize("table", [{"name": "gptq", "bits": 3, "group_size": 16}, {"name": "gptq", "bits": 2, "group_size": -1},
                                   {"name": "rtn", "bits": 4, "group_size": 24},
                                   {"name": "mdbf", "target_bpw": 2.0, "iterations": 1}],
                         ids=lambda t: "-".join(map(str, t.values())))
def test_format_for_counts_the_stored_bits(table):
    """What the budget is counted from is what quantize stores."""
    from onecomp import LayerStats, LayerTask, stored_bits

    reg = onecomp.Registry.default()
    if table["name"] not in reg.names("quantizer"):
        pytest.skip(f"{table['name']} is not installed")
    q = reg.create(reg.resolve("quantizer", table))
    g = torch.Generator().manual_seed(0)
    W, d = torch.randn(40, 72, generator=g), torch.rand(72, generator=g) + 0.1
    c = q.quantize(LayerTask("x", W, LayerStats(H=torch.diag(2 * d), diag=d, n_tokens=100)))
    fmt = q.format_for(W.shape)
    assert stored_bits(c.tensors) == fmt.expected_bits(tuple(W.shape)) and fmt.to_dict() == c.format.to_dict()


def test_registry_checks_planner_needs():
    """A planner may declare diag, hessian, model and capabilities, not what only exists mid-run."""
    import types

    from onecomp import NoConfig, Planner, hookimpl
    from onecomp.registry import Registry

    def planner_needing(needs):
        return type("P", (Planner,), {"name": "p", "Config": NoConfig, "needs": frozenset(needs),
                                      "plan": lambda self, *a, **k: {}})

    def module(cls):
        return types.SimpleNamespace(register_planners=hookimpl(lambda register: register(cls)))

    reg = Registry(entry_points=False)
    with reg.temporarily(module(planner_needing({"diag", "model", "capabilities"})), name="ok"):
        assert "p" in reg.names("planner")
    with pytest.raises(TypeError, match=r"needs has \['cross'\]"):
        with reg.temporarily(module(planner_needing({"diag", "cross"})), name="bad"):
            pass


def test_fisher_cost_weighs_each_output_channel():
    """With unit output weights it is the activation cost; a one-hot weight keeps that row's error only."""
    from onecomp_autobit.costs import weighted_error

    g = torch.Generator().manual_seed(3)
    W, W_hat, d = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g), torch.rand(10, generator=g)
    assert weighted_error(W, W_hat, d, torch.ones(6)) == pytest.approx(weighted_error(W, W_hat, d))
    one_hot = torch.zeros(6)
    one_hot[2] = 3.0
    assert weighted_error(W, W_hat, d, one_hot) == pytest.approx(3 * float(((W - W_hat)[2] ** 2 * d).sum()))


def test_fisher_plan_meets_its_budget_and_prices_with_output_gradients(tiny_llama, calib_batch):
    plan, p, inspection = planned(tiny_llama, calib_batch, {"target_bpw": 3.3, "cost": "fisher", "grad_windows": 2})
    assert p.needs == {"model", "diag", "windows"}
    s = p.summary
    assert s["cost"] == "fisher" and s["planned_bits"] <= 3.3 * s["weights"]
    # the total is the fisher-weighted error of the chosen candidates, recomputed here
    from onecomp_autobit.costs import layer_cost, statistics_for
    from onecomp.pipeline.run import planner_stats

    reg = onecomp.Registry.default()
    stats = planner_stats(tiny_llama, inspection, calib_batch, 8, {"diag"})
    G = onecomp.output_grad_squares(tiny_llama, inspection, calib_batch[:2])
    total = 0.0
    for n, spec in plan.items():
        q = reg.create(spec)
        W = tiny_llama.get_submodule(n).weight.detach().float()
        total += layer_cost(q, n, W, statistics_for(q, stats[n].diag), stats[n].diag, G[n])
    assert s["total_cost"] == pytest.approx(total, rel=1e-5)


def test_output_error_with_a_diagonal_hessian_is_the_activation_cost():
    """inputs = "full" prices ΔW·E[xxᵀ]·ΔWᵀ: with uncorrelated inputs it is the diagonal cost exactly, and
    correlated inputs change it (the error GPTQ cancels across channels counts)."""
    from onecomp_autobit.costs import output_error, weighted_error

    g = torch.Generator().manual_seed(5)
    W, W_hat, d = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g), torch.rand(10, generator=g)
    out = torch.rand(6, generator=g)
    assert output_error(W, W_hat, torch.diag(2 * d), out) == pytest.approx(weighted_error(W, W_hat, d, out))
    X = torch.randn(200, 10, generator=g) @ torch.randn(10, 10, generator=g)
    H = 2 * X.T @ X / 200
    dW = W - W_hat
    assert output_error(W, W_hat, H) == pytest.approx(float(((X @ dW.T) ** 2).sum() / 200), rel=1e-5)


def test_full_input_plan_prices_what_each_candidate_stores(tiny_llama, calib_batch):
    plan, p, inspection = planned(tiny_llama, calib_batch, {"target_bpw": 3.3, "inputs": "full"})
    assert p.needs == {"model", "hessian"}
    s = p.summary
    assert s["inputs"] == "full" and s["planned_bits"] <= 3.3 * s["weights"]
    # the total is the output error of each chosen candidate's real quantization, recomputed here
    from onecomp import LayerTask
    from onecomp.pipeline.run import planner_stats

    reg = onecomp.Registry.default()
    stats = planner_stats(tiny_llama, inspection, calib_batch, 8, {"hessian"})
    total = 0.0
    for n, spec in plan.items():
        W = tiny_llama.get_submodule(n).weight.detach().float()
        r = reg.create(spec).quantize(LayerTask(name=n, W=W, stats=stats[n]))
        dW = (W - r.format.dequantize(r.tensors, r.shape)).double()
        total += float(((dW @ stats[n].H.double()) * dW).sum() / 2)
    assert s["total_cost"] == pytest.approx(total, rel=1e-5)
    with pytest.raises(ConfigError, match="inputs"):
        planned(tiny_llama, calib_batch, {"target_bpw": 3.3, "inputs": "full", "cost": "rtn"})
