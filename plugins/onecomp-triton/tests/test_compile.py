"""The kernels compile for real GPUs, ahead of time, with no GPU present.

The interpreter tests check the arithmetic. This test checks what the interpreter never sees:
that Triton's compiler accepts each kernel (types, constexpr branches, ``tl.dot`` tile sizes)
and lowers it to a cubin for sm_80 and sm_90, using the ptxas shipped in the triton wheel. It
does not run a kernel, because there is no GPU here. All variants (1 … 8 bits × g_idx × fp16 /
bf16 / fp32, and every sign-kernel mode) were compiled once for sm_80; that took 90 s. This
test keeps a sample of them.
"""

import pytest

triton = pytest.importorskip("triton")

from onecomp_triton import kernels  # noqa: E402  (imports triton)


def compile_for(fn, arch, signature, constexprs):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    return triton.compile(ASTSource(triton.jit(fn), sig, constexprs), target=GPUTarget("cuda", arch, 32))


def gptq_variant(arch, bits, dt, g_idx):
    sig = {"x_ptr": f"*{dt}", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*fp16", "gidx_ptr": "*i16",
           "b_ptr": f"*{dt}", "y_ptr": f"*{dt}", **{k: "i32" for k in
           ("M", "N", "K", "G", "WORDS", "ZWORDS", "GROUP", "stride_xm", "stride_ym")}}
    ce = dict(BITS=bits, HAS_GIDX=g_idx, HAS_BIAS=True, PRECISION="ieee" if dt == "fp32" else "tf32",
              BLOCK_M=16, BLOCK_N=64, BLOCK_K=64)
    return compile_for(kernels._gptq_matmul, arch, sig, ce)


def sign_variant(arch, dt, accumulate):
    sig = {"x_ptr": f"*{dt}", "s_ptr": "*u8", "cin_ptr": "*fp16", "cout_ptr": "*fp16",
           "y_ptr": "*fp32" if accumulate else f"*{dt}",
           **{k: "i32" for k in ("M", "N", "K", "BYTES", "L", "stride_xm", "stride_ym")}}
    ce = dict(ACCUMULATE=accumulate, PRECISION="ieee" if dt == "fp32" else "tf32", BLOCK_M=16, BLOCK_N=64,
              BLOCK_K=64)
    return compile_for(kernels._sign_matmul, arch, sig, ce)


@pytest.mark.parametrize("arch, build", [
    (80, lambda a: gptq_variant(a, 3, "fp16", True)),    # codes straddle words, act-order
    (90, lambda a: gptq_variant(a, 4, "bf16", False)),
    (80, lambda a: sign_variant(a, "fp16", True)),
], ids=["gptq-3bit-gidx-fp16-sm80", "gptq-4bit-bf16-sm90", "signs-fp16-sm80"])
def test_kernel_compiles_to_cubin(arch, build):
    if triton.knobs.runtime.interpret:
        pytest.skip("TRITON_INTERPRET=1: triton.jit gives interpreted functions, which do not compile")
    try:
        compiled = build(arch)
    except (ImportError, RuntimeError) as exc:  # e.g. a triton build without its NVIDIA backend
        if "ptxas" in str(exc) or "backend" in str(exc).lower():
            pytest.skip(f"cannot compile for CUDA here: {exc}")
        raise
    assert compiled.asm["cubin"]
    assert "mma" in compiled.asm["ptx"] or "wgmma" in compiled.asm["ptx"]  # tl.dot became tensor-core code
