"""Calibration windows and statistics capture."""

import pytest
import torch

from onecomp import ConfigError
from onecomp.calibration import (SequentialCapture, StatsCollector, calibration_windows, capture_block,
                                 first_block_inputs, leading_windows, propagate, propagate_, sample_windows,
                                 stages_supported)
from onecomp.calibration.capture import _input_of, run_block
from onecomp.config import CorpusSpec
from onecomp.models import inspect_model
from onecomp.models.structure import find_blocks
from onecomp.testing.strategies import make_stats

# ------------------------------------------------------------------ token windows


def test_sample_windows_are_seeded_and_in_range():
    ids = torch.arange(1000)
    w = sample_windows(ids, 16, 32, seed=3)
    assert w.shape == (16, 32) and w.dtype == torch.long
    assert torch.equal(w, sample_windows(ids, 16, 32, seed=3))
    assert not torch.equal(w, sample_windows(ids, 16, 32, seed=4))
    assert (w[:, 1:] - w[:, :-1] == 1).all()  # each window is one contiguous slice of the text
    assert w.min() >= 0 and w.max() < 1000


def test_sample_windows_need_enough_tokens():
    with pytest.raises(ConfigError) as info:
        sample_windows(torch.arange(32), 4, 32, seed=0)
    assert info.value.path == "seq_len" and "only 32 tokens" in info.value.message
    assert sample_windows(torch.arange(33), 4, 32, seed=0).shape == (4, 32)


def test_leading_windows():
    ids = torch.arange(100)
    assert torch.equal(leading_windows(ids, 3, 10), ids[:30].view(3, 10))
    assert leading_windows(ids, 50, 10).shape == (10, 10)  # as many as the text holds
    with pytest.raises(ConfigError):
        leading_windows(torch.arange(5), 1, 10)


def word_tokenizer(text, add_special_tokens=False, return_attention_mask=False):
    """A stand-in tokenizer: every whitespace-separated word is an integer token id."""
    return {"input_ids": [int(w) for w in text.split()]}


@pytest.fixture
def corpora(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(" ".join(str(i) for i in range(0, 500)))
    b.write_text(" ".join(str(i) for i in range(10_000, 10_400)))
    return str(a), str(b)


@pytest.mark.parametrize("weights, samples, counts", [
    ((0.7, 0.3), 10, (7, 3)),
    ((3.0, 1.0), 8, (6, 2)),
    ((1.0, 1.0), 5, (3, 2)),  # the remainder goes to the largest fractional share, first one first
    ((1.0, 9.0), 4, (0, 4)),
])
def test_calibration_windows_weighted_mix(corpora, weights, samples, counts):
    specs = [CorpusSpec(source=src, weight=w) for src, w in zip(corpora, weights)]
    w = calibration_windows(word_tokenizer, specs, samples=samples, seq_len=16, seed=0)
    assert w.shape == (samples, 16)
    from_a = int((w < 10_000).all(1).sum())
    from_b = int((w >= 10_000).all(1).sum())
    assert (from_a, from_b) == counts
    assert torch.equal(w, calibration_windows(word_tokenizer, specs, samples=samples, seq_len=16, seed=0))


def test_calibration_windows_name_the_bad_corpus(corpora, tmp_path):
    specs = [CorpusSpec(source=corpora[0]), CorpusSpec(source=str(tmp_path / "missing.txt"))]
    with pytest.raises(ConfigError) as info:
        calibration_windows(word_tokenizer, specs, samples=4, seq_len=16, seed=0)
    assert info.value.path == "calibration.corpus[1].source"


# ------------------------------------------------------------------ statistics


def batches(seed=0, n=3, shape=(2, 5, 8)):
    g = torch.Generator().manual_seed(seed)
    X_hat = [torch.randn(shape, generator=g) for _ in range(n)]
    X = [x + 0.1 * torch.randn(shape, generator=g) for x in X_hat]
    return X_hat, X


def test_stats_collector_matches_the_definitions():
    X_hat, X = batches()
    c = StatsCollector({"hessian", "cross", "diag", "samples"}, 8, max_samples=20)
    for xh, x in zip(X_hat, X):
        c.add(xh, x)
    stats = c.finish()
    Xh = torch.cat([x.reshape(-1, 8) for x in X_hat])
    Xf = torch.cat([x.reshape(-1, 8) for x in X])
    N = Xh.shape[0]
    assert stats.n_tokens == N == 30
    torch.testing.assert_close(stats.H, 2 / N * Xh.T @ Xh)
    torch.testing.assert_close(stats.cross, 2 / N * (Xf - Xh).T @ Xh)
    torch.testing.assert_close(stats.diag, Xh.square().mean(0))
    assert stats.samples.shape[1] == 8 and 0 < stats.samples.shape[0] <= 20
    rows = {tuple(r.tolist()) for r in Xh}
    assert all(tuple(r.tolist()) in rows for r in stats.samples)  # samples are real input rows
    ref = make_stats(Xh, {"hessian", "cross", "diag"}, Xf)  # the kit's reference agrees
    torch.testing.assert_close(stats.H, ref.H)
    torch.testing.assert_close(stats.cross, ref.cross)


@pytest.mark.parametrize("d,tile", [(8, 3), (70, 16), (64, 64), (5, 256)])
def test_upper_gram_accumulation_equals_the_full_product_and_is_exactly_symmetric(d, tile):
    from onecomp.calibration.capture import add_gram_upper_, mirror_upper_

    g = torch.Generator().manual_seed(d)
    H = torch.zeros(d, d)
    full = torch.zeros(d, d)
    for _ in range(3):
        X = torch.randn(40, d, generator=g) * torch.exp(torch.randn(d, generator=g))
        add_gram_upper_(H, X, tile)
        full.addmm_(X.T, X)
    upper = torch.triu(H)
    mirror_upper_(H, tile)
    torch.testing.assert_close(H, full, rtol=1e-5, atol=1e-5)
    assert torch.equal(H, H.T) and torch.equal(torch.triu(H), upper)  # the upper triangle is kept exactly


def test_stats_collector_keeps_only_what_is_needed():
    X_hat, _ = batches()
    c = StatsCollector({"diag"}, 8)
    for xh in X_hat:
        c.add(xh)
    stats = c.finish()
    assert stats.H is None and stats.cross is None and stats.samples is None and stats.diag is not None
    with pytest.raises(ValueError, match="needs the fp-path input X"):
        StatsCollector({"cross"}, 8).add(X_hat[0])


# ------------------------------------------------------------------ capture on a real block


def test_capture_block_shares_one_statistic_per_input_group(tiny_llama):
    model = tiny_llama
    ins = inspect_model(model)
    _, blocks = find_blocks(model)
    block, info = blocks[0], ins.blocks[0]
    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    q_inputs = first_block_inputs(model, blocks, windows, batch_size=2)
    assert len(q_inputs.hidden) == 2 and q_inputs.n_tokens == 48

    fp_inputs = q_inputs.clone()
    fp_inputs.hidden = [h + 0.01 * torch.randn_like(h) for h in fp_inputs.hidden]
    leaders = {g[0]: block.get_submodule(g[0]) for g in info.groups}
    assert list(leaders) == ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    needs = {"self_attn.q_proj": {"hessian", "cross"}, "self_attn.o_proj": set(),
             "mlp.gate_proj": {"diag"}, "mlp.down_proj": {"hessian"}}

    # what each linear really receives, recorded independently on both paths
    seen = {}

    def record(path, name):
        def hook(m, args):
            seen.setdefault((path, name), []).append(args[0].reshape(-1, args[0].shape[-1]))
        return hook

    names = ["self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"]
    for path, inputs in (("q", q_inputs), ("fp", fp_inputs)):
        handles = [block.get_submodule(n).register_forward_pre_hook(record(path, n)) for n in names]
        propagate(block, inputs)
        for h in handles:
            h.remove()

    expected_fp = propagate(block, fp_inputs)
    fp_batches = list(fp_inputs.hidden)
    stats, fp_out = capture_block(block, leaders, q_inputs, fp_inputs, needs)
    assert fp_inputs.hidden == [None, None]  # consumed batch by batch: one copy of the fp path at a time
    assert set(stats) == {"self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"}  # one per group, if needed
    X_k = torch.cat(seen[("q", "self_attn.k_proj")])
    torch.testing.assert_close(X_k, torch.cat(seen[("q", "self_attn.v_proj")]))
    N = X_k.shape[0]
    s = stats["self_attn.q_proj"]
    assert s.n_tokens == N == 48
    torch.testing.assert_close(s.H, 2 / N * X_k.T @ X_k, rtol=1e-4, atol=1e-5)
    X_fp = torch.cat(seen[("fp", "self_attn.k_proj")])
    torch.testing.assert_close(s.cross, 2 / N * (X_fp - X_k).T @ X_k, rtol=1e-4, atol=1e-5)
    assert s.diag is None
    X_up = torch.cat(seen[("q", "mlp.up_proj")])
    torch.testing.assert_close(stats["mlp.gate_proj"].diag, X_up.square().mean(0), rtol=1e-4, atol=1e-6)
    X_down = torch.cat(seen[("q", "mlp.down_proj")])
    assert stats["mlp.down_proj"].H.shape == (128, 128)
    torch.testing.assert_close(stats["mlp.down_proj"].H, 2 / N * X_down.T @ X_down, rtol=1e-4, atol=1e-5)

    assert len(fp_out.hidden) == 2
    for got, want in zip(fp_out.hidden, expected_fp.hidden):
        torch.testing.assert_close(got, want)
    for m in block.modules():
        assert not m._forward_pre_hooks  # capture removed its hooks
    _, none = capture_block(block, leaders, q_inputs, None, {k: {"hessian"} for k in leaders})
    assert none is None
    assert all(h is not None for h in q_inputs.hidden)  # the quantized path is only read
    del fp_batches


def test_propagate_in_place_equals_propagate_and_reuses_the_container(tiny_llama):
    model = tiny_llama
    _, blocks = find_blocks(model)
    windows = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(1))
    inputs = first_block_inputs(model, blocks, windows, batch_size=2)
    expected = propagate(blocks[0], inputs)
    originals = list(inputs.hidden)
    got = propagate_(blocks[0], inputs)
    assert got is inputs and len(got.hidden) == 3
    for g, e, o in zip(got.hidden, expected.hidden, originals):
        torch.testing.assert_close(g, e)
        assert g.data_ptr() != o.data_ptr()


# ------------------------------------------------------------------ layer-by-layer (true sequential) capture

LEADERS = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
ALL_STATS = {"hessian", "diag", "samples"}


def _block_and_inputs(model, seed=2, n=5):
    _, blocks = find_blocks(model)
    windows = torch.randint(0, 256, (n, 16), generator=torch.Generator().manual_seed(seed))
    return blocks, first_block_inputs(model, blocks, windows, batch_size=2)


def _assert_same_stats(a, b):
    assert a.n_tokens == b.n_tokens
    for field in ("H", "diag", "samples"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-5, atol=1e-6)


def test_sequential_capture_with_nothing_changed_equals_the_block_pass(tiny_llama):
    """With no layer replaced between stages, layer-by-layer statistics are the one-pass statistics, and
    ``finish`` gives the block's own outputs (so a resumed run, which propagates, sees the same inputs)."""
    blocks, inputs = _block_and_inputs(tiny_llama)
    block, info = blocks[0], inspect_model(tiny_llama).blocks[0]
    assert stages_supported(block, info.groups)
    leaders = {g: block.get_submodule(g) for g in LEADERS}
    want, _ = capture_block(block, leaders, inputs, None, {g: ALL_STATS for g in LEADERS})
    expected = propagate(block, inputs)
    seq = SequentialCapture(block, inputs)
    for g in LEADERS:
        _assert_same_stats(seq.stats(g, ALL_STATS), want[g])
    out = seq.finish()
    assert out is inputs  # written in place: one copy of the activations
    for got, e in zip(out.hidden, expected.hidden):
        torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-6)
    for m in block.modules():
        assert not m._forward_pre_hooks


@pytest.mark.parametrize("keep_mb", [0, 0.02, 100])  # none, one batch (2 × 16 × 128 floats), all
def test_sequential_capture_sees_the_layers_replaced_before_each_stage(tiny_llama, keep_mb):
    """True sequential: o_proj's statistics come from the already-changed q/k/v, down_proj's from the changed
    gate/up, and the outputs from the fully changed block: each equals a fresh pass over the changed block
    (also when down_proj's inputs are kept from its stage instead of recomputed)."""
    blocks, inputs = _block_and_inputs(tiny_llama, seed=3)
    block = blocks[0]
    g = torch.Generator().manual_seed(0)

    def perturb(names):
        with torch.no_grad():
            for n in names:
                w = block.get_submodule(n).weight
                w.add_(0.2 * w.abs().mean() * torch.randn(w.shape, generator=g))

    groups = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    seq = SequentialCapture(block, inputs.clone(), keep_mb=keep_mb)
    for leader, group in zip(LEADERS, groups):
        got = seq.stats(leader, {"hessian"})
        fresh, _ = capture_block(block, {leader: block.get_submodule(leader)}, inputs, None, {leader: {"hessian"}})
        torch.testing.assert_close(got.H, fresh[leader].H, rtol=1e-5, atol=1e-6)
        perturb(group)  # "quantize" the group before the next one is calibrated
    kept = sum(m is not None for m in seq.mlp_mid)
    assert kept == {0: 0, 0.02: 1, 100: 3}[keep_mb]
    out = seq.finish()
    for got, e in zip(out.hidden, propagate(block, inputs).hidden):
        torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-6)


def test_sequential_capture_runs_each_norm_once_per_batch(tiny_llama):
    """The normed inputs of q/k/v and gate/up are kept for the next stage, so with every
    ``down_proj`` input kept each RMSNorm of the block runs once per batch."""
    blocks, inputs = _block_and_inputs(tiny_llama)
    block = blocks[0]
    calls = {"input_layernorm": 0, "post_attention_layernorm": 0}
    handles = [block.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: calls.__setitem__(n, calls[n] + 1))
               for n in calls]
    seq = SequentialCapture(block, inputs.clone(), keep_mb=100)
    for leader in LEADERS:
        seq.stats(leader, {"hessian"})
    seq.finish()
    for h in handles:
        h.remove()
    assert calls == {n: len(inputs.hidden) for n in calls}
    assert all(x is None for x in seq.normed)  # nothing held after the block


@pytest.mark.parametrize("keep_mb", [0, 100])
def test_sequential_capture_with_an_fp_copy_gives_cross_of_both_paths(tiny_llama, keep_mb):
    """The fp path (for QEP's ``cross``) runs an unchanged copy beside the changed block: each stage's
    ``cross`` is (X − X̂)ᵀX̂ of a fresh fp pass and a fresh pass over the changed block, its Hessian is the
    quantized path's alone, and ``fp.finish()`` gives the unchanged block's outputs."""
    import copy

    blocks, inputs = _block_and_inputs(tiny_llama, seed=6)
    block = blocks[0]
    fp_block = copy.deepcopy(block)
    g = torch.Generator().manual_seed(1)
    groups = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    seq = SequentialCapture(block, inputs.clone(), keep_mb, fp_block, inputs.clone())
    for leader, group in zip(LEADERS, groups):
        got = seq.stats(leader, {"hessian", "cross"})
        d = block.get_submodule(leader).in_features
        X_hat, X = (torch.cat([_input_of(b.get_submodule(leader), lambda: run_block(b, h, kw)).reshape(-1, d)
                               for h, kw in zip(inputs.hidden, inputs.kwargs)]) for b in (block, fp_block))
        n = X_hat.shape[0]
        torch.testing.assert_close(got.cross, 2 / n * (X - X_hat).T @ X_hat, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.H, 2 / n * X_hat.T @ X_hat, rtol=1e-4, atol=1e-5)
        assert (leader == "self_attn.q_proj") == bool(got.cross.abs().max() == 0)  # paths part after q/k/v change
        with torch.no_grad():
            for name in group:
                w = block.get_submodule(name).weight
                w.add_(0.2 * w.abs().mean() * torch.randn(w.shape, generator=g))
    out, fp_out = seq.finish(), seq.fp.finish()
    for got, e in zip(out.hidden, propagate(block, inputs).hidden):
        torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-6)
    for got, e in zip(fp_out.hidden, propagate(fp_block, inputs).hidden):
        torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="go together"):
        SequentialCapture(block, inputs, 0, fp_block, None)


def test_sequential_capture_runs_stages_in_order_and_finish_runs_the_rest(tiny_llama):
    blocks, inputs = _block_and_inputs(tiny_llama, seed=4, n=3)
    expected = propagate(blocks[0], inputs)
    seq = SequentialCapture(blocks[0], inputs)
    with pytest.raises(RuntimeError, match="out of order"):
        seq.stats("mlp.gate_proj", {"hessian"})
    assert seq.stats("self_attn.q_proj", ()) is None  # nothing needed: the stage still runs, no statistics
    for got, e in zip(seq.finish().hidden, expected.hidden):  # o_proj, gate/up and down stages are run by finish
        torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_the_staged_block_families_compute_what_their_forward_computes(family):
    """STAGED_LAYERS's claim, checked on tiny random models of each family: the staged computation equals
    the block's forward, and inspection finds the four input groups in the staged order."""
    import transformers

    cls = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
    cfg = getattr(transformers, f"{cls}Config")(vocab_size=256, hidden_size=64, intermediate_size=128,
                                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                  head_dim=16, max_position_embeddings=64)
    torch.manual_seed(0)
    model = getattr(transformers, f"{cls}ForCausalLM")(cfg).eval()
    info = inspect_model(model).blocks[0]
    blocks, inputs = _block_and_inputs(model, seed=5, n=4)
    assert stages_supported(blocks[0], info.groups)
    expected = propagate(blocks[0], inputs)
    seq = SequentialCapture(blocks[0], inputs)
    for g in LEADERS:
        seq.stats(g, {"hessian"})
    for got, e in zip(seq.finish().hidden, expected.hidden):
        torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-6)


def test_stages_are_not_claimed_for_other_blocks(tiny_llama):
    _, blocks = find_blocks(tiny_llama)
    assert not stages_supported(blocks[0], [["self_attn.q_proj"], ["mlp.gate_proj"]])
    assert not stages_supported(torch.nn.Linear(2, 2), [[g] for g in LEADERS])
