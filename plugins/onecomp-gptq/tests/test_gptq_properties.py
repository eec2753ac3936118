"""GPTQ's mathematical properties (docs/algorithms.md, "GPTQ and RTN")."""

import pytest
import torch

from onecomp import FormatError, LayerStats, LayerTask, Registry
from onecomp_gptq import GPTQFormat, fake_quantize, find_params, gptq_quantize
from onecomp_gptq.format import GPTQParams
from onecomp_gptq.quantizers import GPTQ, RTN, GPTQConfig, RTNConfig, rtn_quantize


def correlated_activations(n=4096, d=192, seed=0):
    """Activations with the heavy, correlated channels real LLM layers have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    scale = torch.exp(torch.randn(d, generator=g))  # log-normal channel scales (outliers)
    return (torch.randn(n, d, generator=g) @ mix) * scale


def hessian(X):
    return 2 / X.shape[0] * X.T @ X


def dequant(task, compressed):
    fmt = GPTQFormat.from_dict(compressed.params)
    return fmt.dequantize(compressed.tensors, compressed.shape)


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(1)
    X = correlated_activations()
    W = torch.randn(96, X.shape[1], generator=g) * 0.05
    return W, X


@pytest.mark.parametrize("bits,group", [(3, -1), (3, 64), (4, 64), (2, 32)])
def test_gptq_layer_error_below_rtn(layer, bits, group):
    W, X = layer
    task = LayerTask("l", W, LayerStats(n_tokens=X.shape[0], H=hessian(X)))
    W_rtn = dequant(task, RTN(RTNConfig(bits=bits, group_size=group)).quantize(task))
    err_rtn = ((W - W_rtn) @ X.T).norm()
    # GPTQ as published (no shrinkage) fits the calibration activations by a wide margin ...
    W_gptq = dequant(task, GPTQ(GPTQConfig(bits=bits, group_size=group, shrink=0.0)).quantize(task))
    assert ((W - W_gptq) @ X.T).norm() < 0.8 * err_rtn
    # ... and the default, which trades some of that fit for robustness, still beats RTN on it
    W_default = dequant(task, GPTQ(GPTQConfig(bits=bits, group_size=group)).quantize(task))
    assert ((W - W_default) @ X.T).norm() < err_rtn


def test_gptq_on_real_activations_beats_rtn(tiny_llama):
    """On the activations a (random) Llama block really feeds its q/k/v, GPTQ's output error is lower."""
    ids = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    captured = {}
    q_proj = tiny_llama.model.layers[1].self_attn.q_proj
    h = q_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("X", a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        tiny_llama(input_ids=ids)
    h.remove()
    X, W = captured["X"], q_proj.weight.detach()
    task = LayerTask("q", W, LayerStats(n_tokens=X.shape[0], H=hessian(X)))
    W_gptq = dequant(task, GPTQ(GPTQConfig(bits=3, group_size=32)).quantize(task))
    W_rtn = dequant(task, RTN(RTNConfig(bits=3, group_size=32)).quantize(task))
    assert ((W - W_gptq) @ X.T).norm() < ((W - W_rtn) @ X.T).norm()


@pytest.mark.parametrize("group,sym,act_order", [(-1, False, True), (64, False, True), (50, True, False),
                                                 (64, True, True)])
def test_identity_hessian_equals_rtn(layer, group, sym, act_order):
    W, _ = layer
    q, s, z, _, _ = gptq_quantize(W, torch.eye(W.shape[1]), 3, group, sym=sym, act_order=act_order, damp=0)
    q_rtn, s_rtn, z_rtn = rtn_quantize(W, 3, group, sym=sym)
    assert torch.equal(q, q_rtn) and torch.equal(s, s_rtn) and torch.equal(z, z_rtn)


@pytest.mark.parametrize("group,act_order", [(-1, False), (64, True), (50, True)])
def test_loss_identity(layer, group, act_order):
    """Σ per-column losses = tr(E H Eᵀ)/2 for the damped H that GPTQ used."""
    W, X = layer
    H = hessian(X)
    damp = 0.01
    q, s, z, g_idx, losses = gptq_quantize(W, H, 3, group, act_order=act_order, damp=damp)
    params = GPTQParams(bits=3, group_size=group, act_order=act_order)
    fields = {"q": q.long(), "zeros": z.long(), "scales": s}
    if act_order:
        fields["g_idx"] = g_idx
    fmt = GPTQFormat(params)
    W_hat = fmt.dequantize(fmt.pack(fields, W.shape), W.shape)
    H_damped = H.double() + damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=torch.float64)
    E = (W - W_hat).double()
    expected = torch.trace(E @ H_damped @ E.T) / 2
    assert losses.sum().item() == pytest.approx(expected.item(), rel=2e-3)


@pytest.mark.parametrize("group", [-1, 64, 50])
def test_block_size_invariance(layer, group):
    W, X = layer
    H = hessian(X)
    ref = gptq_quantize(W, H, 3, group, block_size=128)
    for bs in (1, 17, 64):
        other = gptq_quantize(W, H, 3, group, block_size=bs)
        mismatch = (other[0] != ref[0]).float().mean().item()
        assert mismatch < 1e-3, (bs, mismatch)  # float reassociation may flip a rare tie
        assert torch.allclose(other[1], ref[1], rtol=1e-3)


def test_dead_columns_zeroed(layer):
    W, X = layer
    X = X.clone()
    X[:, :5] = 0
    task = LayerTask("l", W, LayerStats(n_tokens=X.shape[0], H=hessian(X)))
    W_hat = dequant(task, GPTQ(GPTQConfig(bits=4, group_size=64)).quantize(task))
    assert torch.isfinite(W_hat).all()
    # dead inputs never reach the output, so the zeroed columns cost nothing
    assert ((W - W_hat)[:, 5:] @ X[:, 5:].T).norm() < ((W - W_hat) @ X.T).norm() + 1e-3


def test_act_order_stores_g_idx_and_groups_are_full(layer):
    W, X = layer
    task = LayerTask("l", W, LayerStats(n_tokens=X.shape[0], H=hessian(X)))
    c = GPTQ(GPTQConfig(bits=4, group_size=64, act_order=True)).quantize(task)
    g_idx = c.tensors["g_idx"].long()
    assert torch.bincount(g_idx).tolist() == [64] * (W.shape[1] // 64)
    assert not torch.equal(g_idx, torch.arange(W.shape[1]) // 64)  # a real permutation happened


def test_mse_grid_not_worse_than_minmax(layer):
    W, _ = layer
    q0, s0, z0 = rtn_quantize(W, 3, 64)
    q1, s1, z1 = rtn_quantize(W, 3, 64, mse=True)
    fmt = GPTQFormat(GPTQParams(3, 64))
    e0 = (fmt.dequantize(fmt.pack({"q": q0.long(), "zeros": z0.long(), "scales": s0}, W.shape), W.shape) - W)
    e1 = (fmt.dequantize(fmt.pack({"q": q1.long(), "zeros": z1.long(), "scales": s1}, W.shape), W.shape) - W)
    assert e1.abs().pow(2.4).sum() <= e0.abs().pow(2.4).sum()



def _grid_errors(W, bits, lo_hi, norm=2.4):
    """|W − Ŵ|^norm per row for each candidate range (the search's own objective, recomputed)."""
    maxq = 2**bits - 1
    out = []
    for lo, hi in lo_hi:
        scale = ((hi - lo) / maxq).half().float()
        zero = torch.round(-lo / scale).clamp(0, maxq)
        out.append((fake_quantize(W, scale[:, None], zero[:, None], maxq) - W).abs().pow(norm).sum(1))
    return torch.stack(out, 1)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_search_finds_the_least_error_candidate(bits):
    """step 1 is the exhaustive search; coarse to fine lands between it and the best coarse point."""
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(bits)) * torch.rand(64, 1) * 3
    xmin, xmax = W.min(1).values.clamp(max=0), W.max(1).values.clamp(min=0)
    shrinks = [1 - i / 100 for i in range(80)]
    all_err = _grid_errors(W, bits, [(p * xmin, p * xmax) for p in shrinks])

    def err_of(step):
        s, z = find_params(W, bits, mse=True, step=step)
        maxq = 2**bits - 1
        return (fake_quantize(W, s[:, None], z[:, None], maxq) - W).abs().pow(2.4).sum(1)

    assert torch.allclose(err_of(1), all_err.min(1).values, rtol=1e-6)
    for step in (2, 4, 8):
        e = err_of(step)
        assert (e >= all_err.min(1).values * (1 - 1e-6)).all()
        assert (e <= all_err[:, ::step].min(1).values * (1 + 1e-6)).all()
        assert (e <= all_err[:, 0] * (1 + 1e-6)).all()  # never worse than min-max (shrink 1)


def test_gptq_defaults_use_the_full_mse_search():
    c = GPTQConfig()
    assert c.mse and c.mse_step == 1
    reg = Registry()
    from onecomp import ConfigError
    with pytest.raises(ConfigError, match="mse_step"):
        reg.resolve("quantizer", {"name": "gptq", "mse_step": 0}, "plan.quantizer")

def test_config_validation():
    reg = Registry()
    from onecomp import ConfigError

    with pytest.raises(ConfigError, match=r"plan.quantizer.bits: must be in \[1, 8\]"):
        reg.resolve("quantizer", {"name": "gptq", "bits": 9}, "plan.quantizer")
    with pytest.raises(ConfigError, match="group_size"):
        reg.resolve("quantizer", {"name": "gptq", "group_size": 0}, "plan.quantizer")
    with pytest.raises(ConfigError, match="unknown key; allowed: bits"):
        reg.resolve("quantizer", {"name": "rtn", "damp": 0.1}, "plan.quantizer")


def test_non_finite_weight_refused(layer):
    W, X = layer
    W = W.clone()
    W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        GPTQ().quantize(LayerTask("l", W, LayerStats(n_tokens=1, H=hessian(X))))


def test_full_shrink_without_act_order_is_rtn(layer):
    """β = 1 leaves only the diagonal of H: no error compensation, so RTN exactly."""
    W, X = layer
    q, s, z, _, _ = gptq_quantize(W, hessian(X), 3, 64, act_order=False, shrink=1.0)
    q_rtn, s_rtn, z_rtn = rtn_quantize(W, 3, 64)
    assert torch.equal(q, q_rtn) and torch.equal(s, s_rtn)


def test_shrink_trades_calibration_fit_for_robustness(layer):
    """More shrinkage: a larger error on the calibration activations, never below RTN's floor of 0."""
    W, X = layer
    H = hessian(X)
    errors = []
    for beta in (0.0, 0.5, 1.0):
        q, s, z, g_idx, _ = gptq_quantize(W, H, 3, 64, shrink=beta)
        fmt = GPTQFormat(GPTQParams(3, 64, True))
        W_hat = fmt.dequantize(fmt.pack({"q": q.long(), "zeros": z.long(), "scales": s, "g_idx": g_idx}, W.shape),
                               W.shape)
        errors.append(((W - W_hat) @ X.T).norm().item())
    assert errors[0] < errors[1] < errors[2]


@pytest.mark.parametrize("bits", [2, 4])
def test_numpy_column_step_equals_the_torch_step(bits):
    """The CPU fast path of one GPTQ column (NumPy views) gives the torch path's codes and errors bit for bit,
    including ties at .5 (round half to even) and clamped codes."""
    from onecomp_gptq.quantizers import _quantize_column

    g = torch.Generator().manual_seed(bits)
    maxq = 2**bits - 1
    scale = (torch.rand(257, generator=g) * 0.1 + 0.01).half().float()
    zero = torch.randint(0, maxq + 1, (257,), generator=g).float()
    w = torch.randn(257, generator=g) * 0.3
    w[:40] = scale[:40] * (torch.randint(-4, 5, (40,), generator=g) + 0.5)  # exact ties
    d = 0.7311
    outs = []
    for on_cpu in (True, False):
        q, err = torch.full((257,), -1.0), torch.full((257,), -1.0)
        _quantize_column(w, q, err, scale, zero, maxq, d, on_cpu)
        outs.append((q, err))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert outs[0][0].min() >= 0 and outs[0][0].max() <= maxq


def test_layers_sharing_a_hessian_factor_it_once_with_the_same_result(layer, monkeypatch):
    """q/k/v share one LayerStats: the quantizer factors H once per input group, and the codes equal a
    fresh quantizer's."""
    import onecomp_gptq.quantizers as qz

    W, X = layer
    stats = LayerStats(n_tokens=X.shape[0], H=hessian(X))
    tasks = [LayerTask(name=f"l{i}", W=W * (1 + i), stats=stats) for i in range(3)]
    calls = []
    real = qz.hessian_factor
    monkeypatch.setattr(qz, "hessian_factor", lambda *a, **k: calls.append(1) or real(*a, **k))
    shared = GPTQ(GPTQConfig(bits=3, group_size=64))
    results = [shared.quantize(t) for t in tasks]
    assert len(calls) == 1
    for t, r in zip(tasks, results):
        fresh = GPTQ(GPTQConfig(bits=3, group_size=64)).quantize(t)
        assert all(torch.equal(r.tensors[k], fresh.tensors[k]) for k in fresh.tensors)
    other = LayerTask(name="o", W=W, stats=LayerStats(n_tokens=X.shape[0], H=hessian(X[:2000])))
    shared.quantize(other)
    assert len(calls) == 1 + 1 + 3  # a new H is factored again (plus one per fresh quantizer above)


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("shrink", [0.0, 0.5])
def test_in_place_hessian_factor_equals_the_reference_factorisation(act_order, shrink):
    """The CPU path factors one float64 copy of H in place with LAPACK; it must give U with UᵀU equal to
    the inverse of the permuted, shrunk, damped H, as the plain torch route does."""
    from onecomp_gptq.quantizers import hessian_factor, inverse_cholesky_upper

    g = torch.Generator().manual_seed(3)
    X = torch.randn(300, 90, generator=g) * torch.exp(torch.randn(90, generator=g))
    X[:, 7] = 0  # a dead column
    H = X.T @ X / 300
    dead, perm, U = hessian_factor(H, act_order, 0.01, shrink)
    ref = H.double()
    ref[7, 7] = 1
    diag = ref.diagonal().clone()
    ref.mul_(1 - shrink).diagonal().copy_(diag)
    if act_order:
        assert torch.equal(perm, torch.argsort(diag, descending=True, stable=True))
        ref = ref[perm][:, perm]
    else:
        assert perm is None
    ref.diagonal().add_(0.01 * diag.mean())
    assert dead.tolist() == [i == 7 for i in range(90)]
    assert torch.equal(U, U.triu())
    torch.testing.assert_close(U, inverse_cholesky_upper(ref).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(U.double().T @ U.double(), torch.linalg.inv(ref), rtol=1e-4, atol=1e-6)


def test_hessian_factor_retries_with_more_damping_on_the_in_place_path():
    from onecomp_gptq.quantizers import hessian_factor

    X = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
    info = {}
    _, _, U = hessian_factor(X.T @ X, True, 0.0, 0.0, info)  # rank 4: singular without damping
    assert info == {"damp": 1e-06, "damp_retries": 1} and torch.isfinite(U).all()
    with pytest.raises(FormatError, match="not positive definite"):
        hessian_factor(-torch.eye(6), True, 0.01, 0.0)
