"""QEP's properties (docs/algorithms.md, QEP) and its use with any registered quantizer."""

import pytest
import torch

import onecomp
from onecomp import Compressed, ConfigError, LayerStats, LayerTask, Quantizer, Registry, hookimpl
from onecomp.calibration import StatsCollector
from onecomp_qep import QEP, QEPConfig, qep_correct


def paths(n=3000, d=48, noise=0.3, seed=0):
    """fp-path inputs X and quantized-path inputs X̂ = X + correlated error."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) / d**0.5
    X_hat = X + noise * torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) / d**0.5
    return X, X_hat


def stats(X, X_hat):
    c = StatsCollector({"hessian", "cross"}, X.shape[1])
    c.add(X_hat, X)
    return c.finish()


def test_alpha_one_is_least_squares():
    X, X_hat = paths()
    W = torch.randn(20, X.shape[1])
    s = stats(X, X_hat)
    W_star = qep_correct(W, s.H, s.cross, alpha=1.0, percdamp=0.0)
    W_ls = torch.linalg.lstsq(X_hat.double(), (X @ W.T).double()).solution.T.float()  # argmin ‖X̂W*ᵀ − XWᵀ‖
    assert torch.allclose(W_star, W_ls, atol=1e-3, rtol=1e-3)


def test_alpha_zero_gives_the_base_quantizer():
    X, X_hat = paths()
    W = torch.randn(20, X.shape[1])
    task = LayerTask("l", W, stats(X, X_hat))
    out = QEP(QEPConfig(alpha=0.0)).adjust(task)
    assert torch.equal(out.W, W)
    reg = Registry()
    gptq = reg.create(reg.resolve("quantizer", {"name": "gptq", "bits": 3, "group_size": 16}))
    a, b = gptq.quantize(task), gptq.quantize(out)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_equal_paths_leave_w_unchanged():
    X, _ = paths()
    W = torch.randn(20, X.shape[1])
    out = QEP().adjust(LayerTask("l", W, stats(X, X.clone())))
    assert torch.allclose(out.W, W, atol=1e-6)


def test_correction_fits_the_quantized_path_better():
    """‖X̂W*ᵀ − XWᵀ‖ falls as α goes 0 → 0.5 → 1."""
    X, X_hat = paths()
    W = torch.randn(20, X.shape[1])
    s = stats(X, X_hat)
    errs = [(X_hat @ qep_correct(W, s.H, s.cross, a).T - X @ W.T).norm().item() for a in (0.0, 0.5, 1.0)]
    assert errs[0] > errs[1] > errs[2]


class Toy(torch.nn.Module):
    def __init__(self, d=64, h=96, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1 = torch.nn.Linear(d, h, bias=False)
        self.fc2 = torch.nn.Linear(h, d, bias=False)
        self.fc1.weight.data = torch.randn(h, d, generator=g) / d**0.5
        self.fc2.weight.data = torch.randn(d, h, generator=g) / h**0.5

    def forward(self, x, w1=None, w2=None):
        w1 = self.fc1.weight if w1 is None else w1
        w2 = self.fc2.weight if w2 is None else w2
        return torch.relu(x @ w1.T) @ w2.T


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_two_layer_network_end_to_end_error_falls(quantizer):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(4096, 64, generator=g) * torch.exp(torch.randn(64, generator=g))
    net = Toy()
    reg = Registry()
    q = reg.create(reg.resolve("quantizer", {"name": quantizer, "bits": 3, "group_size": 32}))
    fmt = lambda c: c.format  # noqa: E731

    def compress(W, X_in, X_fp, use_qep):
        c = StatsCollector({"hessian", "cross"}, W.shape[1])
        c.add(X_in, X_fp)
        task = LayerTask("l", W, c.finish())
        if use_qep:
            task = QEP(QEPConfig(alpha=0.5)).adjust(task)
        out = q.quantize(task)
        return fmt(out).dequantize(out.tensors, out.shape)

    errors = {}
    for use_qep in (False, True):
        W1 = compress(net.fc1.weight.detach(), X, X, use_qep)
        H_fp = torch.relu(X @ net.fc1.weight.detach().T)
        H_q = torch.relu(X @ W1.T)
        W2 = compress(net.fc2.weight.detach(), H_q, H_fp, use_qep)
        errors[use_qep] = (net(X, W1, W2) - net(X)).norm().item()
    assert errors[True] < errors[False], errors


def test_works_with_a_dummy_quantizer_through_the_pipeline(tiny_llama):
    """A quantizer defined here, found by name in the config, gets QEP's corrected W* once the
    blocks before have been quantized (X̂ ≠ X)."""
    seen = {}

    class Dummy(Quantizer):
        name = "dummy"
        needs = frozenset({"hessian"})

        def quantize(self, task):  # one magnitude per row: coarse enough that X̂ drifts from X
            seen[task.name] = task.W.clone()
            W_hat = task.W.sign() * task.W.abs().mean(1, keepdim=True)
            return Compressed(reg.get("format", "dense").from_dict({"dtype": "float32"}),
                              {"weight": W_hat.contiguous()}, task.shape)

    class Plugin:
        @hookimpl
        def register_quantizers(self, register):
            register(Dummy)

    original = {n: m.weight.detach().clone() for n, m in tiny_llama.named_modules() if isinstance(m, torch.nn.Linear)
                and ".layers." in n}
    reg = Registry()
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    with reg.temporarily(Plugin(), name="dummy-plugin"):
        onecomp.compress(tiny_llama, config={"plan": {"quantizer": {"name": "dummy"}},
                                             "refiners": [{"name": "qep", "skip": []}]},
                         windows=windows, registry=reg)
    assert set(seen) == set(original)
    later = [n for n in original if ".layers.0." not in n]
    assert later and all(not torch.allclose(seen[n], original[n]) for n in later)  # the targets were corrected


def test_skip_and_config_validation():
    assert not QEP().applies_to("model.layers.3.mlp.down_proj")
    assert QEP().applies_to("model.layers.3.self_attn.q_proj")
    reg = Registry()
    with pytest.raises(ConfigError, match=r"refiners\[0\].alpha: must be in \[0, 1\]"):
        reg.resolve("refiner", {"name": "qep", "alpha": 1.5}, "refiners[0]")


def test_shared_factor_is_reused_within_a_group_only():
    X, X_hat = paths()
    s = stats(X, X_hat)
    qep = QEP()
    W = torch.randn(8, X.shape[1])
    a = qep.adjust(LayerTask("q", W, s)).W
    b = QEP(QEPConfig(shared_hessian=False)).adjust(LayerTask("q", W, s)).W
    assert torch.allclose(a, b)
    s2 = stats(*paths(seed=1))
    c = qep.adjust(LayerTask("k", W, s2)).W
    d = QEP().adjust(LayerTask("k", W, s2)).W
    assert torch.allclose(c, d)  # a new Ĥ is factorised again, never confused with the old one


def test_damping_grows_when_tokens_are_few_per_input_column():
    qep = QEP()
    assert qep.damping(576, 128 * 512) == 0.01  # the protocol's size: the authors' fixed damping
    assert qep.damping(576, 16 * 256) == pytest.approx(576 / 4096)
    assert qep.damping(576, 0) == 0.01  # token count unknown
    assert QEP(QEPConfig(sample_damp=0.0)).damping(576, 16) == 0.01


def test_sample_damping_generalises_better_from_few_tokens():
    """Fitted on N = 2·in tokens, the sample-size damping lowers the error on fresh tokens
    from the same distribution, over several seeds."""
    d, W = 48, torch.randn(20, 48, generator=torch.Generator().manual_seed(1))
    for seed in range(5):
        X, X_hat = paths(n=2 * d + 4000, d=d, seed=seed)
        fit, test = slice(0, 2 * d), slice(2 * d, None)
        task = LayerTask("l", W, stats(X[fit], X_hat[fit]))
        errs = [(X_hat[test] @ QEP(QEPConfig(alpha=1.0, sample_damp=sd)).adjust(task).W.T
                 - X[test] @ W.T).norm().item() for sd in (0.0, 1.0)]
        assert errs[1] < errs[0]


def test_a_non_finite_hessian_is_a_clean_error():
    """NaN statistics end in onecomp's error type (one line in the CLI), never a linear-algebra traceback."""
    from onecomp import FormatError

    X, X_hat = paths(n=200, d=8)
    s = stats(X, X_hat)
    s.H[0, 0] = float("nan")
    with pytest.raises(FormatError, match="NaN or Inf"):
        qep_correct(torch.randn(4, 8), s.H, s.cross)
