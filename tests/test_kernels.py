"""The torch backend's CPU kernels and kernel selection: each kernel computes x Ŵᵀ + b of the stored
tensors (the reference: dequantize, then fp32 matmul), gives the stored tensors back exactly, and
QuantLinear keeps its checkpoint semantics while a kernel holds the weight."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import onecomp
from onecomp.builtin import cpu_kernels
from onecomp.builtin.cpu_kernels import Int4Linear, PerCallLinear, cpu_kernel, int4_pack, int4_unpack, kernel_group
from onecomp.checkpoint import QuantLinear
from onecomp.kernels import resolve_backends, select_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.int4_available(), reason="torch without the packed int4 CPU kernel")


def gptq(registry, **params):
    return registry.get("format", "gptq").from_dict(params)


def weight(fmt, shape, seed=0):
    return fmt.pack(fmt.example(shape, torch.Generator().manual_seed(seed)), shape)


def reference(fmt, stored, shape, x, bias=None):
    return torch.nn.functional.linear(x, fmt.dequantize(stored, shape), bias)


def close_bf16(y, ref, x, fmt, stored, shape):
    """Within the int4 kernel's rounding: scale and zero s(8 − z) in bf16 put each weight within
    16 |s| 2⁻⁹ of Ŵ; bf16 inputs and output add 2⁻⁸ of the magnitude sum |x| |Ŵ|ᵀ."""
    f = fmt.unpack(stored, shape)
    g_idx = f["g_idx"] if "g_idx" in f else fmt.default_g_idx(shape)
    S = f["scales"].float()[:, g_idx]
    W = fmt.dequantize(stored, shape)
    bound = 2 ** -5 * (x.abs() @ S.T) + 2 ** -8 * (x.abs() @ W.abs().T) + 1e-6
    assert ((y - ref).abs() <= bound).all(), float(((y - ref).abs() / bound).max())


@settings(max_examples=10, deadline=None)
@given(blocks=st.integers(1, 9), k32=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_int4_unpack_inverts_the_packer(blocks, k32, seed):
    N, K = 16 * blocks, 32 * k32
    q = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    assert torch.equal(int4_unpack(int4_pack(q), N, K), q)


def test_kernel_group_is_the_largest_size_dividing_every_boundary():
    assert kernel_group(torch.tensor([128, 256, 384, 512, 576]), 576) == 64  # 576 = 4·128 + 64
    assert kernel_group(torch.tensor([256, 512]), 512) == 256
    assert kernel_group(torch.tensor([48, 96]), 96) is None


@settings(max_examples=15, deadline=None)
@given(bits=st.integers(1, 4), group=st.sampled_from([-1, 32, 64, 128, 96, 192]), n16=st.integers(1, 4),
       k32=st.integers(1, 8), act_order=st.booleans(), with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_int4_kernel_equals_the_reference(bits, group, n16, k32, act_order, with_bias, seed):
    shape = (16 * n16, 32 * k32)  # groups of 96 and 192 leave ragged last groups and need kernel groups of 32
    fmt = gptq(onecomp.Registry.default(), bits=bits, group_size=group, act_order=act_order)
    stored = weight(fmt, shape, seed)
    bias = torch.randn(shape[0]) if with_bias else None
    k = cpu_kernel(fmt, stored, shape, bias)
    assert isinstance(k, Int4Linear)
    x = torch.randn(2, 3, shape[1], generator=torch.Generator().manual_seed(seed))
    close_bf16(k(x), reference(fmt, stored, shape, x, bias), x, fmt, stored, shape)
    back = k.stored()
    assert set(back) == set(stored) and all(torch.equal(back[n], stored[n]) for n in stored)


def test_act_order_permutes_inputs_once_and_keeps_gptq_groups(registry):
    shape = (32, 256)
    fmt = gptq(registry, bits=4, group_size=64, act_order=True)
    stored = weight(fmt, shape)
    k = cpu_kernel(fmt, stored, shape, None)
    assert k.perm is not None and k.group == 64
    g_idx = stored["g_idx"].long()
    assert (g_idx[k.perm].diff() >= 0).all()  # sorted by group: each kernel group lies in one gptq group


def test_ragged_last_group_is_split_exactly(registry):
    shape = (64, 576)  # 576 columns in groups of 128: the last group has 64
    fmt = gptq(registry, bits=4, group_size=128)
    stored = weight(fmt, shape)
    k = cpu_kernel(fmt, stored, shape, None)
    assert k.group == 64 and k.scales_and_zeros.shape == (9, 64, 2)
    x = torch.randn(5, 576)
    close_bf16(k(x), reference(fmt, stored, shape, x), x, fmt, stored, shape)


def test_what_the_int4_kernel_cannot_take_runs_per_call(registry):
    for params, shape in [({"bits": 4, "group_size": 48}, (32, 96)),  # no kernel group divides 48
                          ({"bits": 4, "group_size": 32}, (40, 64)),  # rows not a multiple of 16
                          ({"bits": 6, "group_size": 64}, (32, 128))]:
        fmt = gptq(registry, **params)
        stored = weight(fmt, shape)
        k = cpu_kernel(fmt, stored, shape, None)
        assert isinstance(k, PerCallLinear)
        x = torch.randn(3, shape[1])
        torch.testing.assert_close(k(x), reference(fmt, stored, shape, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,group,act_order", [(3, 32, False), (5, 64, True), (8, -1, False), (7, 16, False)])
def test_per_call_tiles_match_the_reference(registry, monkeypatch, bits, group, act_order):
    monkeypatch.setattr(cpu_kernels, "TILE_BYTES", 1)  # tiles of 32 rows: zeros words split between tiles
    shape = (100, 80)
    fmt = gptq(registry, bits=bits, group_size=group, act_order=act_order)
    stored = weight(fmt, shape)
    k = PerCallLinear(fmt, stored, shape, torch.randn(100))
    x = torch.randn(2, 4, 80)
    torch.testing.assert_close(k(x), reference(fmt, stored, shape, x, k.bias), rtol=1e-5, atol=1e-5)


def test_mdbf_runs_its_sign_matmuls(registry):
    pytest.importorskip("onecomp_mdbf")
    fmt = registry.get("format", "mdbf").from_dict({"rank": 16, "envelope_rank": 2, "terms": 2})
    shape = (24, 40)
    stored = weight(fmt, shape)
    k = cpu_kernel(fmt, stored, shape, None)
    assert k.kernel_name == "mdbf-sign-matmuls"
    x = torch.randn(3, 40)
    torch.testing.assert_close(k(x), reference(fmt, stored, shape, x), rtol=1e-4, atol=1e-4)


def test_unknown_formats_and_params_are_declined(registry):
    dense = registry.get("format", "dense").from_dict({})
    assert cpu_kernel(dense, {"weight": torch.randn(16, 32)}, (16, 32), None) is None


def test_quantlinear_holds_the_weight_once_and_keeps_its_state_dict(registry):
    shape = (32, 64)
    fmt = gptq(registry, bits=4, group_size=32)
    stored = weight(fmt, shape)
    layer = QuantLinear(fmt, shape, stored, torch.randn(32))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 64)
    ref = layer(x)
    layer.use_kernel(cpu_kernel(fmt, layer.stored(), shape, layer.bias), "torch")
    assert layer.kernel_name == "torch:gptq-int4pack" and layer.owned_by_kernel
    assert not any(k in dict(layer.named_buffers()) for k in stored)  # held once, in the kernel's layout
    after = layer.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    close_bf16(layer(x), ref, x, fmt, stored, shape)
    # a training caller (input needs grad) takes the differentiable path and gets the exact gradient
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    torch.testing.assert_close(xg.grad, layer.dequantize().sum(0).expand(3, 64))
    layer.load_state_dict(before)
    assert layer.kernel is None and all(torch.equal(layer.stored()[k], stored[k]) for k in stored)


def test_reference_path_keeps_no_copy_unless_asked(registry):
    shape = (16, 32)
    fmt = gptq(registry, bits=4, group_size=32)
    layer = QuantLinear(fmt, shape, weight(fmt, shape), cache_dequantized=False)
    with torch.no_grad():
        layer(torch.randn(2, 32))
    assert layer._cache is None
    layer.cache_dequantized = True
    with torch.no_grad():
        layer(torch.randn(2, 32))
    assert layer._cache is not None


def test_select_kernels_asks_backends_in_order(registry, tiny_llama):
    fmt = gptq(registry, bits=4, group_size=32)
    for name, m in list(tiny_llama.named_modules()):
        if isinstance(m, torch.nn.Linear) and "proj" in name:
            shape = tuple(m.weight.shape)
            onecomp.replace_module(tiny_llama, name, QuantLinear(fmt, shape, weight(fmt, shape)))

    class Declines(onecomp.Backend):
        name = "declines"

    chosen = select_kernels(tiny_llama, [Declines(), *resolve_backends("torch", registry)])
    assert len(chosen) == 14 and set(chosen.values()) == {"torch:gptq-int4pack"}
    assert set(select_kernels(tiny_llama, [Declines()]).values()) == {"reference"}


def test_resolve_backends(registry):
    names = [b.name for b in resolve_backends("auto", registry)]
    assert names[-1] == "torch" and names[:-1] == sorted(names[:-1])
    assert resolve_backends(None, registry) == []
    with pytest.raises(onecomp.ConfigError, match="backend"):
        resolve_backends("no-such-backend", registry)


def test_torch_backend_reports_what_it_runs_natively(registry):
    caps = resolve_backends("torch", registry)[0].capabilities()
    assert caps.device == "cpu" and caps.formats == {"gptq": (1, 2, 3, 4)} and caps.threads >= 1
    assert math.isfinite(caps.free_memory) and "int4" in caps.notes
