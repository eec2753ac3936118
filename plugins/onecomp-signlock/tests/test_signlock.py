"""Sign lock-in's properties (docs/algorithms.md, "Sign lock-in") and its place in configs."""

from types import SimpleNamespace

import attrs
import pytest
import torch

from onecomp import ConfigError, Format, Quantizer, Refiner, Registry, hookimpl
from onecomp.config import load_config
from onecomp.training import TrainableLinear, params_by_kind, select
from onecomp_signlock import SignLock, SignLockConfig


def lock(**cfg) -> SignLock:
    return SignLock(SignLockConfig(**cfg))


# ------------------------------------------------------------------ a toy sign-factorised layer


class ToySign(Format):
    """Ŵ = diag(scale) · S with S ∈ {±1}: one sign carrier per weight, trained through a latent."""

    name = "toy-sign"
    trainable = ("scale",)
    discrete = {"sign": "sign"}

    def pack(self, fields, shape):
        return {"sign": fields["sign"].to(torch.int8), "scale": fields["scale"].float()}

    def unpack(self, stored, shape):
        return dict(stored)

    def dequantize_fields(self, fields, shape):
        return fields["scale"][:, None] * fields["sign"]

    def expected_bits(self, shape):
        return shape[0] * shape[1] * 8 + shape[0] * 32


def train_toy(reg=None, out=32, inp=64, n=48, steps=300, lr=0.01, noise=0.5, seed=0):
    """Fit noisy targets of a sign layer with Adam, the way a training refiner does: the sign
    field opened as a float latent (straight-through), loss relative to ‖Y‖², the regularizer
    called with the 'sign' tensors. With n < inp the noise can be fitted by flipping signs.
    Returns (flip rate against the starting signs, loss per step, final latents)."""
    g = torch.Generator().manual_seed(seed)
    S0 = torch.where(torch.rand(out, inp, generator=g) < 0.5, 1, -1).to(torch.int8)
    scale = torch.rand(out, generator=g) + 0.5
    W0 = scale[:, None] * S0.float()
    X = torch.randn(n, inp, generator=g)
    Y = X @ W0.T + noise * (W0.norm() / out**0.5) * torch.randn(n, out, generator=g)
    fmt = ToySign()
    stored = fmt.pack({"sign": S0, "scale": scale}, (out, inp))
    # a stand-in for a QuantLinear: what TrainableLinear reads from one
    layer = SimpleNamespace(format=fmt, shape=(out, inp), stored=lambda: stored, bias=None)
    lin = TrainableLinear(layer)
    by_kind = params_by_kind({"toy": lin})
    opt = torch.optim.Adam([p for d in by_kind.values() for p in d.values()], lr=lr)
    targets = (lambda: select(by_kind, reg.targets)) if reg else None
    if reg:
        reg.init(targets())
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (lin(X) - Y).square().sum() / Y.square().sum()
        if reg:
            loss = loss + reg.penalty(targets())
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if reg:
            reg.step(targets())
    if reg:
        reg.finish(targets())
    latent = by_kind["sign"]["toy.sign"].detach()
    rate = ((latent >= 0) != (S0 > 0)).float().mean().item()
    return rate, losses, [p.detach().clone() for d in by_kind.values() for p in d.values()]


def test_toy_run_flip_rate_falls_at_least_tenfold():
    """Default config: 13.5% of signs flip without the regularizer, 0.15% with it (seed 0)."""
    without, _, _ = train_toy()
    reg = lock()
    with_, _, _ = train_toy(reg)
    assert without > 0.05, f"the toy must flip signs for the test to mean anything, got {without:.4f}"
    assert with_ * 10 <= without, f"flip rate {with_:.4f} with signlock vs {without:.4f} without"
    r = reg.report()
    assert r["carriers"] == 32 * 64 and r["steps"] == 300
    assert r["flip_rate"] == pytest.approx(with_) and r["flipped"] == round(with_ * r["carriers"])
    assert r["peak_flip_rate"] >= r["flip_rate"] and r["flip_events"] >= r["flipped"]


def test_zero_strength_and_gap_change_nothing():
    """λ = 0, g = 0: the whole trajectory is bit-identical to training without the regularizer."""
    rate_a, losses_a, final_a = train_toy()
    reg = lock(strength=0.0, gap=0.0, epsilon=0.5)
    rate_b, losses_b, final_b = train_toy(reg)
    assert losses_a == losses_b and rate_a == rate_b
    assert all(torch.equal(a, b) for a, b in zip(final_a, final_b))
    assert reg.report()["flip_rate"] == rate_a > 0  # it still counts the flips


def test_zero_gap_leaves_tensors_bit_identical():
    w = torch.tensor([0.0, -0.0, 1.5, -2.0])
    before = w.clone()
    lock(gap=0.0).init({"m.sign": w})
    assert torch.equal(w, before) and torch.equal(w.signbit(), before.signbit())


# ------------------------------------------------------------------ penalty


@pytest.mark.parametrize("relative", [False, True])
def test_penalty_zero_outside_margin_positive_inside_with_outward_gradient(relative):
    g = torch.Generator().manual_seed(1)
    w0 = (torch.rand(200, generator=g) + 0.5) * torch.where(torch.rand(200, generator=g) < 0.5, 1.0, -1.0)
    s0 = torch.where(w0 >= 0, 1.0, -1.0)
    reg = lock(strength=0.01, epsilon=0.2, relative=relative)
    reg.init({"m.sign": w0})
    eps = 0.2 * (w0.abs().mean().item() if relative else 1.0)

    w = w0.clone().requires_grad_(True)  # every |w| ≥ 0.5 > ε on its own side
    p = reg.penalty({"m.sign": w})
    p.backward()
    assert p.item() == 0.0 and torch.all(w.grad == 0)

    w = w0.clone()
    w[:10] = s0[:10] * 0.5 * eps  # inside the margin, own side
    w[10:20] = -s0[10:20] * 0.3  # crossed over
    w.requires_grad_(True)
    p = reg.penalty({"m.sign": w})
    p.backward()
    want = 0.01 * (10 * 0.5 * eps + 10 * (eps + 0.3))
    assert p.item() == pytest.approx(want, rel=1e-5)
    assert torch.equal(w.grad[:20], -0.01 * s0[:20])  # descent moves s0·w up: outward on s0's side
    assert torch.all(w.grad[20:] == 0)


def test_penalty_sums_over_tensors_and_ties_count_as_plus():
    reg = lock(strength=1.0, epsilon=1.0, relative=False)
    a, b = torch.zeros(3), torch.tensor([-2.0, 0.5])
    reg.init({"x.sign": a, "y.sign": b})  # a: s0 = +1 (ties); b: s0 = (−1, +1)
    p = reg.penalty({"x.sign": a, "y.sign": b})
    assert p.item() == pytest.approx(3 * 1.0 + 0.0 + 0.5)


def test_penalty_of_zero_strength_or_nothing_is_zero():
    w = torch.randn(5)
    reg = lock(strength=0.0)
    reg.init({"m.sign": w})
    assert reg.penalty({"m.sign": -w}).item() == 0.0
    assert lock().penalty({}).item() == 0.0


# ------------------------------------------------------------------ gap initialisation


@pytest.mark.parametrize("relative", [False, True])
def test_gap_moves_every_magnitude_out_and_keeps_signs(relative):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(1000, generator=g) * 0.1
    w[:5] = 0.0
    w[5:10] = -0.0
    before = w.clone()
    lock(gap=0.3, relative=relative).init({"m.sign": w})
    gap = 0.3 * (before.abs().mean().item() if relative else 1.0)
    assert torch.all(w.abs() >= gap - 1e-7)
    assert torch.equal(w >= 0, before >= 0)  # ties (±0) go to +g
    assert torch.allclose(w.abs(), before.abs() + gap)


def test_init_refuses_non_finite():
    with pytest.raises(ValueError, match="non-finite"):
        lock().init({"m.sign": torch.tensor([1.0, float("nan")])})


# ------------------------------------------------------------------ flip tracking


def test_step_and_finish_track_flips_on_the_kept_values():
    w = torch.tensor([1.0, -1.0, 1.0, -1.0])
    reg = lock()
    reg.init({"m.sign": w})
    reg.step({"m.sign": torch.tensor([-1.0, -1.0, 1.0, 1.0])})  # two flips
    reg.step({"m.sign": torch.tensor([1.0, -1.0, 1.0, 1.0])})  # one flips back
    r = reg.report()
    assert (r["flipped"], r["flip_events"], r["peak_flip_rate"], r["steps"]) == (1, 3, 0.5, 2)
    reg.finish({"m.sign": w})  # a refiner restored the starting state: nothing flipped in the end
    r = reg.report()
    assert (r["carriers"], r["flipped"], r["flip_rate"], r["flip_events"]) == (4, 0, 0.0, 3)


def test_state_accumulates_over_blocks():
    reg = lock()
    blocks = [{"b0.q.sign": torch.ones(6), "b0.k.sign": -torch.ones(4)}, {"b1.q.sign": torch.ones(10)}]
    for i, params in enumerate(blocks):
        reg.init(params)
        for v in params.values():
            v[: i + 1] *= -1  # block 0: one flip per tensor, block 1: two
        reg.step(params)
        reg.finish(params)
    r = reg.report()
    assert (r["carriers"], r["flipped"], r["tensors"]) == (20, 4, 3)
    assert r["flip_rate"] == pytest.approx(0.2)
    with pytest.raises(KeyError, match="already finished"):
        reg.penalty(blocks[0])
    with pytest.raises(KeyError, match="not passed to init"):
        reg.step({"b2.q.sign": torch.ones(3)})


# ------------------------------------------------------------------ registry and config


def test_registry_finds_it():
    assert Registry.default().get("regularizer", "signlock") is SignLock
    assert SignLock.targets == "sign"


def test_config_defaults_and_errors_name_the_field():
    reg = Registry.default()
    spec = reg.resolve("regularizer", {"name": "signlock"})
    assert attrs.asdict(spec.config) == {"strength": 1e-3, "epsilon": 0.05, "gap": 0.0, "relative": True}
    for key, value, message in [("strength", -1.0, "must be in [0, inf]"), ("epsilon", float("inf"), "finite"),
                                ("gap", "big", "must be a number"), ("relative", 1, "true or false")]:
        with pytest.raises(ConfigError) as info:
            reg.resolve("regularizer", {"name": "signlock", key: value}, "r")
        assert info.value.path == f"r.{key}" and message in info.value.message


@attrs.define
class _TrainConfig:
    lr: float = 1e-3
    regularizers: list = attrs.Factory(list)


class _Train(Refiner):
    """A block-scope refiner with a ``regularizers`` field, standing in for ``blockwise``."""

    name = "dummy-train"
    Config = _TrainConfig
    scope = "block"

    def refine_block(self, ctx):
        return {}


class _Q(Quantizer):
    name = "dummy-q"

    def quantize(self, task):
        raise AssertionError("config tests never quantize")


@pytest.fixture
def registry():
    reg = Registry(only={"signlock"})  # built-ins and this plugin

    @hookimpl
    def register_refiners(register):
        register(_Train)

    @hookimpl
    def register_quantizers(register):
        register(_Q)

    with reg.temporarily(SimpleNamespace(register_refiners=register_refiners,
                                         register_quantizers=register_quantizers), name="dummies"):
        yield reg


def pipeline(refiner: str, regularizer: dict) -> dict:
    return {"plan": {"quantizer": "dummy-q"}, "refiners": [{"name": refiner, "regularizers": [regularizer]}]}


def test_pipeline_config_with_signlock_validates(registry):
    cfg = load_config(pipeline("dummy-train", {"name": "signlock", "strength": 1e-3}), registry=registry)
    assert cfg.refiners[0].config.regularizers == [{"name": "signlock", "strength": 1e-3}]
    with pytest.raises(ConfigError) as info:
        load_config(pipeline("dummy-train", {"name": "signlock", "strength": -1}), registry=registry)
    assert info.value.path == "refiners[0].regularizers[0].strength"
    with pytest.raises(ConfigError) as info:
        load_config(pipeline("dummy-train", {"name": "signlock", "margin": 0.1}), registry=registry)
    assert info.value.path == "refiners[0].regularizers[0].margin"


def test_pipeline_config_with_the_builtin_blockwise_refiner(registry):
    if "blockwise" not in registry.names("refiner"):
        pytest.skip("the core's blockwise refiner is not registered")
    cfg = load_config(pipeline("blockwise", {"name": "signlock", "strength": 1e-3}), registry=registry)
    assert cfg.refiners[0].name == "blockwise"
