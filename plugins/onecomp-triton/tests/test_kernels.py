"""Every Triton kernel, run in Triton's interpreter on CPU, against dequantize-then-matmul.

The backend is built with ``interpret = true``: kernels are decorated and launched with
``triton.knobs.runtime.interpret`` on, which is what ``TRITON_INTERPRET=1`` does, but scoped to
the launch, so the rest of the pytest session is untouched. ``test_env_var_path`` checks the
``TRITON_INTERPRET=1`` route itself in a fresh process (the variable only takes effect when set
before triton is imported).

Tolerance: fp32 inputs must match the reference within ``1e-5 · (|x| @ |Ŵ|ᵀ + |b|) + 1e-6`` per
output, i.e. a relative 1e-5 of the magnitude sum a reassociated fp32 dot product can lose
accuracy against (K ≤ 80 terms at 2⁻²⁴ each stays below 5e-6); fp16 inputs within 1e-2 of it.
Shapes are drawn small and the tiles set to 16 so that several tiles, ragged edges of every
tile and ragged last groups all occur.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import onecomp
from onecomp_triton import TritonBackend, TritonConfig, reference_linear

pytest.importorskip("triton")

BACKEND = TritonBackend(TritonConfig(interpret=True, block_m=16, block_n=16, block_k=16))


def format_class(name):
    try:
        return onecomp.Registry.default().get("format", name)
    except onecomp.UnknownComponent:
        pytest.skip(f"format {name!r} is not installed")


def check(fmt, shape, seed, batch, dtype=torch.float32, with_bias=True, rel=1e-5):
    g = torch.Generator().manual_seed(seed)
    stored = fmt.pack(fmt.example(shape, g), shape)
    bias = torch.randn(shape[0], generator=g) if with_bias else None
    module = BACKEND.kernel(fmt, stored, shape, bias)
    assert module is not None, f"the interpreter backend declined {fmt.name} {fmt.to_dict()}"
    x = torch.randn(*batch, shape[1], generator=g).to(dtype)
    assert module.runs_kernel(x)
    y = module(x)
    ref = reference_linear(fmt, stored, shape, x.float(), bias)
    W = fmt.dequantize(stored, shape)
    bound = rel * (x.float().abs() @ W.abs().T + (bias.abs() if with_bias else 0)) + 1e-6
    err = (y.float() - ref).abs()
    assert y.shape == (*batch, shape[0]) and y.dtype == dtype
    assert (err <= bound).all(), f"{fmt.name} {fmt.to_dict()} {shape}: max error {err.max():.3g}, " \
                                 f"worst error/bound {(err / bound).max():.3g}"


@st.composite
def gptq_cases(draw):
    out, inp = draw(st.integers(1, 40)), draw(st.integers(1, 80))
    params = {"bits": draw(st.integers(1, 8)),
              "group_size": draw(st.one_of(st.just(-1), st.integers(1, inp + 3))),
              "act_order": draw(st.booleans())}
    return params, (out, inp)


@settings(max_examples=80, deadline=None)
@given(case=gptq_cases(), seed=st.integers(0, 2**16), rows=st.integers(1, 20), bias=st.booleans())
def test_gptq_kernel(case, seed, rows, bias):
    params, shape = case
    check(format_class("gptq").from_dict(params), shape, seed, (rows,), with_bias=bias)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_kernel_ragged_act_order(bits):
    """The cases named in the brief, fixed: a ragged last group (70 = 4·16 + 6) with a g_idx."""
    fmt = format_class("gptq").from_dict({"bits": bits, "group_size": 16, "act_order": True})
    check(fmt, (33, 70), seed=bits, batch=(2, 3))


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 40), m=st.integers(1, 60), rank=st.integers(1, 24), l=st.integers(1, 3),
       terms=st.integers(1, 3), seed=st.integers(0, 2**16), rows=st.integers(1, 20), bias=st.booleans())
def test_mdbf_kernel(n, m, rank, l, terms, seed, rows, bias):
    fmt = format_class("mdbf").from_dict({"rank": rank, "envelope_rank": l, "terms": terms})
    check(fmt, (n, m), seed, (rows,), with_bias=bias)


@pytest.mark.parametrize("name, params", [("gptq", {"bits": 3, "group_size": 8, "act_order": True}),
                                          ("mdbf", {"rank": 12, "envelope_rank": 2, "terms": 2})])
def test_fp16_inputs(name, params):
    check(format_class(name).from_dict(params), (24, 40), seed=1, batch=(5,), dtype=torch.float16, rel=1e-2)


def test_env_var_path():
    """``TRITON_INTERPRET=1`` set before triton is imported: a default backend takes the layer."""
    format_class("gptq")
    code = textwrap.dedent("""
        import os, torch, onecomp
        assert os.environ["TRITON_INTERPRET"] == "1"
        from onecomp_triton import TritonBackend, reference_linear
        fmt = onecomp.Registry.default().get("format", "gptq").from_dict({"bits": 3, "group_size": 5})
        g = torch.Generator().manual_seed(0)
        stored = fmt.pack(fmt.example((20, 37), g), (20, 37))
        module = TritonBackend().kernel(fmt, stored, (20, 37), None)
        x = torch.randn(3, 37, generator=g)
        err = (module(x) - reference_linear(fmt, stored, (20, 37), x)).abs().max().item()
        print(type(module).__name__, err)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    name, err = proc.stdout.split()
    assert name == "TritonGPTQLinear" and float(err) < 1e-4
