"""onecomp.output_grad_squares: E[(∂L/∂y)²] per output channel of each decoder linear."""

import torch
import torch.nn.functional as F

import onecomp
from onecomp.models import inspect_model


def test_equals_autograd_on_each_linear_output(tiny_llama, calib_batch):
    """Against gradients taken directly with autograd on the outputs, window by window."""
    inspection = inspect_model(tiny_llama)
    got = onecomp.output_grad_squares(tiny_llama, inspection, calib_batch)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    outs = {}
    handles = [tiny_llama.get_submodule(n).register_forward_hook(lambda m, a, y, _n=n: outs.__setitem__(_n, y))
               for n in names]
    expected = {n: torch.zeros(tiny_llama.get_submodule(n).out_features, dtype=torch.float64) for n in names}
    try:
        for i in range(len(calib_batch)):
            ids = calib_batch[i:i + 1]
            embeds = tiny_llama.get_input_embeddings()(ids).detach().requires_grad_()
            logits = tiny_llama(inputs_embeds=embeds, use_cache=False).logits
            loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            grads = torch.autograd.grad(loss, [outs[n] for n in names])
            for n, g in zip(names, grads):
                expected[n] += g.double().square().sum((0, 1))
    finally:
        for h in handles:
            h.remove()
    assert set(got) == {f"{b.prefix}.{rel}" for b in inspection.blocks for rel in b.linears}
    for n in names:
        torch.testing.assert_close(got[n], (expected[n] / calib_batch.numel()).float(), rtol=1e-4, atol=1e-12)
        assert (got[n] > 0).all()


def test_leaves_the_model_as_it_was(tiny_llama, calib_batch):
    tiny_llama.model.norm.weight.requires_grad_(True)
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    flags = {n: p.requires_grad for n, p in tiny_llama.named_parameters()}
    onecomp.output_grad_squares(tiny_llama, inspect_model(tiny_llama), calib_batch[:2])
    assert {n: p.requires_grad for n, p in tiny_llama.named_parameters()} == flags
    assert all(p.grad is None for p in tiny_llama.parameters())
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())
    assert not tiny_llama._forward_hooks and not tiny_llama.get_submodule("model.layers.0.mlp.up_proj")._forward_hooks
