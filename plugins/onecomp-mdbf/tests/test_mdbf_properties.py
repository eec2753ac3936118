"""DBF / MDBF properties (docs/algorithms.md, "DBF and MDBF"): the bit formula, the fit, the inference path."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onecomp import ConfigError, LayerStats, LayerTask, Registry
from onecomp.testing import strategies as ost
from onecomp_mdbf import MDBF, MDBFConfig, MDBFFormat, MDBFParams, bits_per_weight, fit, fit_term, rank_for
from onecomp_mdbf.factorize import importance_scales
from onecomp_mdbf.format import mdbf_bits, pack_signs, unpack_signs

fast = settings(derandomize=True, max_examples=25, deadline=None, database=None)


def structured(n=64, m=96, seed=0):
    """A low-rank-plus-noise weight with uneven row scales, like a real layer in miniature."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, 8, generator=g) @ torch.randn(8, m, generator=g) / 3 + 0.3 * torch.randn(n, m, generator=g)
    return W * torch.exp(0.5 * torch.randn(n, 1, generator=g))


def quantize(W, diag=None, **cfg):
    task = LayerTask("layer", W, LayerStats(n_tokens=1, diag=diag))
    c = MDBF(MDBFConfig(**cfg)).quantize(task)
    fmt = MDBFFormat.from_dict(c.params)
    return c, fmt, fmt.dequantize(c.tensors, c.shape)


# ---------------------------------------------------------------- bits


@fast
@given(n8=st.integers(1, 12), m8=st.integers(1, 12), r8=st.integers(1, 12), l=st.integers(1, 3), P=st.integers(1, 3))
def test_stored_bits_equal_the_formula_for_multiples_of_8(n8, m8, r8, l, P):
    n, m, r = 8 * n8, 8 * m8, 8 * r8
    fmt = MDBFFormat(MDBFParams(rank=r, envelope_rank=l, terms=P))
    stored = fmt.pack(fmt.example((n, m), torch.Generator().manual_seed(0)), (n, m))
    bits = sum(t.numel() * t.element_size() * 8 for t in stored.values())
    assert bits == mdbf_bits(n, m, r, l, P) == P * (r * (n + m) + 16 * l * (n + m + 2 * r))
    assert fmt.bits_per_weight(stored, (n, m)) == pytest.approx(bits_per_weight(n, m, r, l, P), rel=1e-12)


@fast
@given(n=st.integers(1, 70), m=st.integers(1, 70), r=st.integers(1, 70), P=st.integers(1, 3))
def test_padding_is_at_most_seven_bits_per_sign_row(n, m, r, P):
    fmt = MDBFFormat(MDBFParams(rank=r, envelope_rank=1, terms=P))
    extra = fmt.expected_bits((n, m)) - mdbf_bits(n, m, r, 1, P)
    assert extra == P * (n * ((-r) % 8) + r * ((-m) % 8))


@fast
@given(shape=ost.shapes(300, 300, min_out=8, min_in=8), l=st.integers(1, 3), P=st.integers(1, 3),
       target=st.floats(0.3, 4.0))
def test_rank_is_the_largest_that_meets_the_target(shape, l, P, target):
    n, m = shape
    r = rank_for(n, m, l, P, target)
    assert bits_per_weight(n, m, r + 1, l, P) > target
    if r >= 1:
        assert bits_per_weight(n, m, r, l, P) <= target


def test_quantizer_refuses_a_target_below_one_rank():
    with pytest.raises(ValueError, match="target_bpw 1.0 is too low"):
        quantize(torch.randn(8, 8), target_bpw=1.0)


@pytest.mark.parametrize("cfg, field", [({"terms": 0}, "terms"), ({"envelope_rank": 0}, "envelope_rank"),
                                        ({"target_bpw": 0}, "target_bpw"), ({"iterations": -1}, "iterations"),
                                        ({"inner": 0}, "inner"), ({"reg": -0.1}, "reg"),
                                        ({"importance": 1}, "importance"), ({"terms": 2.5}, "terms")])
def test_bad_config_names_the_field(cfg, field):
    with pytest.raises(ConfigError) as info:
        Registry.default().resolve("quantizer", {"name": "mdbf", **cfg}, "quantizer")
    assert info.value.path == f"quantizer.{field}"


# ---------------------------------------------------------------- the format


def test_sign_bits_are_little_endian_per_row():
    S = torch.tensor([[1, -1, -1, 1, 1, 1, 1, 1, -1], [-1] * 9], dtype=torch.int8)
    packed = pack_signs(S)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0b11111001, 0], [0, 0]]
    assert torch.equal(unpack_signs(packed, 9), S)


def test_dbf_is_one_envelope_one_term():
    """With l = 1 and P = 1, Ŵ = diag(A) S_A diag(Q_U ⊙ Q_V) S_B diag(B): DBF's form."""
    fmt = MDBFFormat(MDBFParams(rank=12, envelope_rank=1, terms=1))
    f = fmt.example((20, 30), torch.Generator().manual_seed(3))
    a, b = f["A"][0, :, 0].float(), f["B"][0, :, 0].float()
    q = f["Q_U"][0, :, 0].float() * f["Q_V"][0, :, 0].float()
    dbf = torch.diag(a) @ f["S_A"][0].float() @ torch.diag(q) @ f["S_B"][0].float() @ torch.diag(b)
    torch.testing.assert_close(fmt.dequantize(fmt.pack(f, (20, 30)), (20, 30)), dbf)


def test_linear_is_two_sign_matmuls_without_forming_the_weight(monkeypatch):
    c, fmt, W_hat = quantize(structured(), target_bpw=2.0, iterations=3)
    g = torch.Generator().manual_seed(0)
    x, bias = torch.randn(2, 5, 96, generator=g), torch.randn(64, generator=g)
    ref = torch.nn.functional.linear(x, W_hat, bias)
    monkeypatch.setattr(MDBFFormat, "dequantize_fields", lambda *a: pytest.fail("linear() formed Ŵ"))
    y = fmt.linear(x, c.tensors, c.shape, bias)
    assert y.shape == (2, 5, 64)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


# ---------------------------------------------------------------- the fit


def test_error_falls_with_iterations():
    W = structured()
    s = importance_scales(torch.rand(96, generator=torch.Generator().manual_seed(1)) + 0.1, 96)
    errors = [fit(W, 24, 1, 2, T, scales=s)[1]["rel_err"][-1] for T in (0, 2, 8, 32)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0], errors


def test_svd_init_alone_beats_random_signs():
    W = structured()
    W_sq = float(W.square().sum())
    for l in (1, 2):
        svd = fit_term(W, 24, l, 0, init="svd")[1][0] / W_sq
        rand = fit_term(W, 24, l, 0, init="random")[1][0] / W_sq
        assert svd < 0.7 * rand, (l, svd, rand)


def test_fit_keeps_the_best_round_and_reports_it():
    W = structured()
    term, history = fit_term(W, 24, 2, 10)
    assert float((W - term.W()).square().sum()) == pytest.approx(min(history), rel=1e-3)


def test_importance_weighting_lowers_the_output_error():
    """Columns with large E[x²] matter more for X Wᵀ; weighting the fit by sqrt(E[x²]) follows them."""
    W = structured()
    X = ost.activations(2048, 96, seed=2) * torch.exp(1.5 * torch.randn(96, generator=torch.Generator().manual_seed(4)))
    diag = X.square().mean(0)
    _, _, weighted = quantize(W, diag, target_bpw=1.5, iterations=15)
    _, _, plain = quantize(W, diag, target_bpw=1.5, iterations=15, importance=False)
    out = lambda W_hat: float(((W - W_hat) @ X.T).square().sum())  # noqa: E731
    assert out(weighted) < 0.8 * out(plain)


def test_stats_none_falls_back_to_unweighted():
    W = structured()
    task = LayerTask("layer", W, LayerStats())
    a = MDBF(MDBFConfig(target_bpw=1.5, iterations=3)).quantize(task)
    b = MDBF(MDBFConfig(target_bpw=1.5, iterations=3, importance=False)).quantize(task)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_threads_setting_is_restored():
    before = torch.get_num_threads()
    quantize(structured(), target_bpw=1.5, iterations=2, threads=1)
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------- training contract


def test_block_training_through_sign_latents_lowers_the_output_error():
    """onecomp.training opens an mdbf layer (fp16 envelopes, sign latents through the STE); a few Adam
    steps on the layer output improve it, and commit() stores valid mdbf tensors again."""
    from onecomp.checkpoint import QuantLinear
    from onecomp.training import open_for_training

    W = structured()
    X = ost.activations(512, 96, seed=5)
    c, fmt, _ = quantize(W, X.square().mean(0), target_bpw=1.5, iterations=5)
    root = torch.nn.Sequential(QuantLinear(fmt, c.shape, c.tensors))
    opened = open_for_training(root)
    layer = opened["0"]
    loss = lambda: ((root(X) - X @ W.T).square().mean())  # noqa: E731
    with torch.no_grad():
        start = float(loss())
    opt = torch.optim.Adam([{"params": [p], "lr": 1e-2 * float(p.detach().square().mean().sqrt())}
                            for p in layer.params.values()])
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
    done = layer.commit()
    fmt.check(done.stored(), c.shape)
    root[0] = done
    with torch.no_grad():
        assert float(loss()) < start


# ---------------------------------------------------------------- real weights


@pytest.fixture(scope="module")
def real_layers():
    from onecomp.models import load_model

    blocks = load_model("smollm2-135m").model.model.layers
    names = [(0, "self_attn.q_proj"), (15, "self_attn.o_proj"), (29, "self_attn.k_proj"), (8, "mlp.down_proj")]
    return {f"{b}.{n}": blocks[b].get_submodule(n).weight.detach().clone() for b, n in names}


def _rel_err(W, l, P, target=None, r=None, iterations=15):
    n, m = W.shape
    r = r if r is not None else rank_for(n, m, l, P, target)
    terms, report = fit(W, r, l, P, iterations)
    return report["rel_err"][-1], bits_per_weight(n, m, r, l, P)


@pytest.mark.integration
def test_more_envelope_rank_helps_at_equal_middle_rank(real_layers):
    """The rank-2 envelope is more expressive than DBF's rank-1 one for the same sign bases."""
    for name, W in real_layers.items():
        r = min(W.shape) // 2
        e1, _ = _rel_err(W, 1, 1, r=r)
        e2, _ = _rel_err(W, 2, 1, r=r)
        assert e2 < e1, (name, e1, e2)


@pytest.mark.integration
@pytest.mark.xfail(strict=True, reason="measured: on SmolLM2-135M (576-wide layers) an extra envelope rank costs "
                                       "16(n+m+2r) bits, 3-16% of the middle rank at 1-2 bpw, and gains 0.6-3.8% "
                                       "error at equal rank (block 3), so DBF wins at matched bpw; sign-fixed "
                                       "least-squares envelopes and exact sign flips after ADMM help l=1 and l=2 "
                                       "alike and do not change that (README, 'MDBF versus DBF')")
def test_mdbf_l2_beats_dbf_at_matched_bpw(real_layers):
    for name, W in real_layers.items():
        dbf, dbf_bpw = _rel_err(W, 1, 1, 1.5)
        mdbf, mdbf_bpw = _rel_err(W, 2, 1, 1.5)
        assert mdbf_bpw <= dbf_bpw + 0.01
        assert mdbf < dbf, (name, dbf, mdbf)
