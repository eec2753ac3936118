"""The Triton kernels and their launchers. Importing this module imports triton.

Two kernels, each one tiled matmul ``y[M, N] = x[M, K] @ Ŵ[N, K]ᵀ`` that builds the tile of
``Ŵ`` it needs from the stored tensors in registers, never the whole weight:

* ``gptq_matmul``: ``Ŵ_nk = s[n, g] (q_nk − z[n, g])`` with ``g = g_idx[k]`` (act-order) or
  ``k // group_size``. Codes are read from the little-endian bit stream of each ``qweight`` row
  (a code may straddle two int32 words when 32 % bits ≠ 0); zero points from the one ``qzeros``
  stream at position ``n·G + g``. Any group size works, a ragged last group included, since the
  group of every column is computed, not assumed to be tile-aligned.
* ``sign_matmul``: ``y (+)= Σ_t c_out[:, t] ⊙ ((x ⊙ c_in[:, t]) @ Sᵀ)`` with ``S`` ±1 read from
  bit-packed uint8 rows. ``mdbf`` runs it twice per term: ``h = Q_V ⊙ S_B (B ⊙ x)``, then
  ``y += A ⊙ S_A (Q_U ⊙ h)``.

``interpret=True`` runs them in Triton's interpreter (numpy, any device, slow): the kernels are
decorated and launched with ``triton.knobs.runtime.interpret`` set, the same as running under
``TRITON_INTERPRET=1``, without changing the environment of the rest of the process.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
import triton
import triton.language as tl


def _gptq_matmul(x_ptr, qw_ptr, qz_ptr, s_ptr, gidx_ptr, b_ptr, y_ptr,
                 M, N, K, G, WORDS, ZWORDS, GROUP, stride_xm, stride_ym,
                 BITS: tl.constexpr, HAS_GIDX: tl.constexpr, HAS_BIAS: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = rm < M, rn < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        mask_w = mask_n[:, None] & mask_k[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_GIDX:
            g = tl.load(gidx_ptr + rk, mask=mask_k, other=0).to(tl.int32)
        else:
            g = rk // GROUP
        # codes: bits k·BITS … k·BITS+BITS−1 of row n's stream
        bit = rk * BITS
        lo = tl.load(qw_ptr + rn[:, None] * WORDS + (bit // 32)[None, :], mask=mask_w, other=0)
        # zero points: position n·G + g of the qzeros stream
        zbit = (rn[:, None] * G + g[None, :]) * BITS
        zlo = tl.load(qz_ptr + zbit // 32, mask=mask_w, other=0)
        if 32 % BITS == 0:  # a code never straddles a word
            q = (lo >> (bit % 32)[None, :]) & ((1 << BITS) - 1)
            z = (zlo >> (zbit % 32)) & ((1 << BITS) - 1)
        else:  # join each word with the next one (zero past the end) and shift in 64 bits
            hi = tl.load(qw_ptr + rn[:, None] * WORDS + (bit // 32 + 1)[None, :],
                         mask=mask_w & ((bit // 32 + 1) < WORDS)[None, :], other=0)
            zhi = tl.load(qz_ptr + zbit // 32 + 1, mask=mask_w & (zbit // 32 + 1 < ZWORDS), other=0)
            both = lo.to(tl.uint32).to(tl.int64) | (hi.to(tl.int64) << 32)
            zboth = zlo.to(tl.uint32).to(tl.int64) | (zhi.to(tl.int64) << 32)
            q = ((both >> (bit % 32)[None, :].to(tl.int64)) & ((1 << BITS) - 1)).to(tl.int32)
            z = ((zboth >> (zbit % 32).to(tl.int64)) & ((1 << BITS) - 1)).to(tl.int32)
        s = tl.load(s_ptr + rn[:, None] * G + g[None, :], mask=mask_w, other=0.0).to(tl.float32)
        w = (s * (q - z).to(tl.float32)).to(x.dtype)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def _sign_matmul(x_ptr, s_ptr, cin_ptr, cout_ptr, y_ptr, M, N, K, BYTES, L, stride_xm, stride_ym,
                 ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = rm < M, rn < N
    out = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for t in range(0, L):  # the envelope rank: one sign matmul per envelope column
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask_k = rk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask_m[:, None] & mask_k[None, :],
                        other=0.0)
            c = tl.load(cin_ptr + rk * L + t, mask=mask_k, other=0.0).to(tl.float32)
            xs = (x.to(tl.float32) * c[None, :]).to(x.dtype)
            byte = tl.load(s_ptr + rn[:, None] * BYTES + (rk // 8)[None, :],
                           mask=mask_n[:, None] & mask_k[None, :], other=0).to(tl.int32)
            sign = (((byte >> (rk % 8)[None, :]) & 1) * 2 - 1).to(x.dtype)  # bit 1 → +1, 0 → −1
            acc += tl.dot(xs, tl.trans(sign), input_precision=PRECISION)
        out += acc * tl.load(cout_ptr + rn * L + t, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    mask_y = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        out += tl.load(y_ptrs, mask=mask_y, other=0.0).to(tl.float32)
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask_y)


_DECORATED: dict[bool, SimpleNamespace] = {}


@contextlib.contextmanager
def _mode(interpret: bool):
    """Triton's interpreter switched on inside the block when ``interpret`` (knobs restored after)."""
    if not interpret:
        yield
        return
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = True
        yield


def _kernels(interpret: bool) -> SimpleNamespace:
    interpret = interpret or bool(triton.knobs.runtime.interpret)
    if interpret not in _DECORATED:
        with _mode(interpret):
            _DECORATED[interpret] = SimpleNamespace(gptq=triton.jit(_gptq_matmul), signs=triton.jit(_sign_matmul))
    return _DECORATED[interpret]


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 exactly as the reference; 16-bit types ignore it


def gptq_matmul(x: torch.Tensor, qweight, qzeros, scales, g_idx, bias, *, bits: int, group_size: int,
                interpret: bool = False, block_m: int = 16, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """``x @ Ŵᵀ + bias`` for a ``gptq`` weight; ``x`` is ``[M, K]``, ``group_size`` the resolved size
    (``K`` for per-channel), ``g_idx`` None without act-order."""
    M, K = x.shape
    N, G = scales.shape
    x = x.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    k = _kernels(interpret)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    with _mode(interpret):
        k.gptq[grid](x, qweight, qzeros, scales, g_idx if g_idx is not None else qzeros,
                     bias if bias is not None else scales, y,
                     M, N, K, G, qweight.shape[1], qzeros.shape[0], group_size, x.stride(0), y.stride(0),
                     BITS=bits, HAS_GIDX=g_idx is not None, HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype),
                     BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y


def sign_matmul(x: torch.Tensor, signs, c_in, c_out, y: torch.Tensor, *, accumulate: bool, interpret: bool = False,
                block_m: int = 16, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """``y (+)= Σ_t c_out[:, t] ⊙ ((x ⊙ c_in[:, t]) @ Sᵀ)`` in place; ``signs`` ``[N, ceil(K/8)]`` uint8,
    ``c_in`` ``[K, L]``, ``c_out`` ``[N, L]``."""
    M, K = x.shape
    N, L = c_out.shape
    if M == 0 or N == 0:
        return y
    k = _kernels(interpret)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    with _mode(interpret):
        k.signs[grid](x.contiguous(), signs.contiguous(), c_in.contiguous(), c_out.contiguous(), y,
                      M, N, K, signs.shape[1], L, x.stride(0), y.stride(0),
                      ACCUMULATE=accumulate, PRECISION=_precision(x.dtype),
                      BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y


def mdbf_matmul(x: torch.Tensor, stored, bias, *, interpret: bool = False, block_m: int = 16, block_n: int = 64,
                block_k: int = 64) -> torch.Tensor:
    """``x @ Ŵᵀ + bias`` for an ``mdbf`` weight, ``x`` ``[M, m]``: two sign matmuls per term, the
    envelopes applied as channel scales around them; terms accumulate in fp32."""
    blocks = dict(interpret=interpret, block_m=block_m, block_n=block_n, block_k=block_k)
    P, n, _ = stored["A"].shape
    r = stored["Q_U"].shape[1]
    M = x.shape[0]
    x = x.contiguous()
    y = torch.zeros(M, n, dtype=torch.float32, device=x.device)
    for p in range(P):
        h = torch.empty(M, r, dtype=x.dtype, device=x.device)
        sign_matmul(x, stored["S_B_bits"][p], stored["B"][p], stored["Q_V"][p], h, accumulate=False, **blocks)
        sign_matmul(h, stored["S_A_bits"][p], stored["Q_U"][p], stored["A"][p], y, accumulate=True, **blocks)
    y = y.to(x.dtype)
    return y + bias.to(x.dtype) if bias is not None else y
