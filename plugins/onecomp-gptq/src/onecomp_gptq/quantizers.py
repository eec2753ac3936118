"""GPTQ and RTN: both emit the ``gptq`` format.

GPTQ minimises ‖WX − ŴX‖² one column at a time, spreading each column's rounding error
over the not-yet-quantized columns through the upper Cholesky factor of H⁻¹, in lazy
blocks of ``block_size`` columns (Frantar et al., 2022, Alg. 1).
"""

from __future__ import annotations

import math

import attrs
import numpy as np
import torch

from onecomp import Compressed, FormatError, LayerTask, Quantizer, in_range

from .format import GPTQFormat, GPTQParams, check_group_size
from .grid import codes, find_params


@attrs.define
class RTNConfig:
    bits: int = attrs.field(default=4, validator=in_range(1, 8))
    group_size: int = attrs.field(default=128, validator=check_group_size)
    sym: bool = False
    mse: bool = False
    mse_step: int = attrs.field(default=1, validator=in_range(1, 64))


@attrs.define
class GPTQConfig:
    bits: int = attrs.field(default=4, validator=in_range(1, 8))
    group_size: int = attrs.field(default=128, validator=check_group_size)
    sym: bool = False
    act_order: bool = True
    damp: float = attrs.field(default=0.01, validator=in_range(0, None))
    shrink: float = attrs.field(default=0.5, validator=in_range(0, 1))  # see benchmarks/results/ood_layers.md
    block_size: int = attrs.field(default=128, validator=in_range(1, None))
    mse: bool = True  # see README, "MSE grid"
    mse_step: int = attrs.field(default=1, validator=in_range(1, 64))


def _check_finite(task: LayerTask) -> None:
    if not torch.isfinite(task.W).all():
        raise ValueError(f"{task.name}: the weight has non-finite values")


def _check_range(task: LayerTask, q, scale, zero, bits: int, group_size: int, g_idx=None) -> None:
    """Refuse, naming the layer, what float16 scales cannot hold: a step past fp16's range (weights too
    large: Inf scales, or a grid search forced to clip) or a layer whose every weight rounds to zero
    (weights below the smallest fp16 step)."""
    row_step = (task.W.max(1).values.clamp(min=0) - task.W.min(1).values.clamp(max=0)) / (2**bits - 1)
    if not bool(torch.isfinite(scale).all()) or float(row_step.max()) > torch.finfo(torch.float16).max:
        raise FormatError(f"{task.name}: its weights (max |w| {float(task.W.abs().max()):.3g}) need quantization "
                          "steps beyond float16's range (65504), which the gptq format stores; leave this layer "
                          "out of the plan (the planner's ignore list) or rescale it")
    cols = g_idx if g_idx is not None else torch.arange(q.shape[1]) // (q.shape[1] if group_size == -1 else group_size)
    if bool((task.W != 0).any()) and bool((q == zero[:, cols.to(q.device)]).all()):
        raise FormatError(f"{task.name}: every weight rounds to zero (max |w| {float(task.W.abs().max()):.3g} is "
                          f"below the smallest float16 step the gptq format stores, "
                          f"{torch.finfo(torch.float16).tiny:.3g}); leave this layer out of the plan (the "
                          "planner's ignore list) or rescale it")


def _pack(task, q, scale, zero, bits, group_size, g_idx=None) -> Compressed:
    _check_range(task, q, scale, zero, bits, group_size, g_idx)
    params = GPTQParams(bits=bits, group_size=group_size, act_order=g_idx is not None)
    fields = {"q": q.to(torch.int16), "zeros": zero.long(), "scales": scale}  # codes < 2⁸: int16, not int64
    if g_idx is not None:
        fields["g_idx"] = g_idx
    fmt = GPTQFormat(params)
    return Compressed(fmt, fmt.pack(fields, task.shape), task.shape)


def rtn_quantize(W: torch.Tensor, bits: int, group_size: int, sym: bool = False, mse: bool = False,
                 mse_step: int = 1):
    """Round to nearest per group: codes ``[out, in]``, scales and zeros ``[out, G]``."""
    out, inp = W.shape
    g = inp if group_size == -1 else group_size
    maxq = 2**bits - 1
    q, scales, zeros = torch.empty_like(W), [], []
    for c in range(0, inp, g):
        s, z = find_params(W[:, c:c + g], bits, sym, mse, step=mse_step)
        q[:, c:c + g] = codes(W[:, c:c + g], s[:, None], z[:, None], maxq)
        scales.append(s)
        zeros.append(z)
    return q, torch.stack(scales, 1), torch.stack(zeros, 1)


class RTN(Quantizer):
    """Round to nearest on the min-max (or MSE-searched) grid; needs no calibration data."""

    name = "rtn"
    Config = RTNConfig
    needs = frozenset()

    def format_for(self, shape) -> GPTQFormat:
        return GPTQFormat(GPTQParams(bits=self.config.bits, group_size=self.config.group_size, act_order=False))

    def quantize(self, task: LayerTask) -> Compressed:
        _check_finite(task)
        c = self.config
        q, s, z = rtn_quantize(task.W.float(), c.bits, c.group_size, c.sym, c.mse, c.mse_step)
        return _pack(task, q, s, z, c.bits, c.group_size)


def inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """Upper U with UᵀU = H⁻¹, from one Cholesky of the flipped H: U = J·L̃⁻¹·J where JHJ = L̃L̃ᵀ."""
    L = torch.linalg.cholesky(H.flip(0, 1))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)


def _inverse_cholesky_upper_inplace(B: torch.Tensor) -> torch.Tensor | None:
    """``inverse_cholesky_upper`` of H for ``B = J·H·J`` (H flipped, float64, CPU), as float32, written
    over B by LAPACK in place: one float64 copy of H instead of six. None when H is not positive definite."""
    from scipy.linalg import lapack

    F = B.numpy().T  # B is symmetric: its Fortran-ordered view is B itself, which LAPACK factors in place
    L, info = lapack.dpotrf(F, lower=1, clean=1, overwrite_a=1)
    if info != 0:
        return None
    Linv, info = lapack.dtrtri(L, lower=1, overwrite_c=1)
    if info != 0:
        return None
    U = np.empty(F.shape, dtype=np.float32)
    np.copyto(U, Linv[::-1, ::-1], casting="same_kind")  # U = J·L̃⁻¹·J
    return torch.from_numpy(U)


def _quantize_column(w, q, err, scale, zero, maxq: int, d: float, on_cpu: bool) -> None:
    """One GPTQ column step, written into the rows ``q`` (codes) and ``err`` ((w − ŵ)/d).

    On CPU the same float32 operations run through NumPy views of the same memory: a column
    step is a dozen tiny vector ops, where NumPy's per-call overhead is a fraction of torch's
    (bit-identical results; tested against the torch path)."""
    if not on_cpu:
        q.copy_(codes(w, scale, zero, maxq))
        err.copy_((w - scale * (q - zero)).div_(d))
        return
    w, q, err, scale, zero = w.numpy(), q.numpy(), err.numpy(), scale.numpy(), zero.numpy()
    np.divide(w, scale, out=q)
    np.rint(q, out=q)  # round half to even, as torch.round
    q += zero
    np.clip(q, 0, maxq, out=q)
    np.subtract(q, zero, out=err)
    err *= scale
    np.subtract(w, err, out=err)
    err /= np.float32(d)


#: how often the damping of an H that is not positive definite is multiplied by 10 before giving up
DAMP_RETRIES = 8


def hessian_factor(H: torch.Tensor, act_order: bool = True, damp: float = 0.01, shrink: float = 0.0,
                   info: dict | None = None):
    """What GPTQ needs from H alone: ``(dead, perm, Hinv)`` — the dead-column mask, the act-order
    permutation (None without act_order) and the upper Cholesky factor of the permuted, shrunk and
    damped H⁻¹. Layers fed by one input (q/k/v, gate/up) share it.

    An H that is not positive definite after damping is retried with the damping ×10 (from 1e-6 when
    it was 0), up to DAMP_RETRIES times; ``info`` receives ``damp`` and ``damp_retries`` when that happened.
    The work is in float64; on CPU it holds one float64 copy of H (down_proj's H is the largest matrix
    the layer-wise stage keeps)."""
    diag_H = H.diagonal().double()
    dead = diag_H == 0
    diag_H[dead] = 1
    perm = torch.argsort(diag_H, descending=True, stable=True) if act_order else None
    order = perm if perm is not None else torch.arange(H.shape[0], device=H.device)
    flip = order.flip(0)  # the Cholesky below works on J·H·J: permuted and flipped in one gather

    def permuted(reverse: bool) -> torch.Tensor:
        idx = flip if reverse else order
        B = torch.empty(H.shape, dtype=torch.float64, device=H.device)
        for i in range(0, H.shape[0], 128):  # row tiles: no full-size float32 temporary
            B[i:i + 128] = H[idx[i:i + 128]][:, idx]
        if shrink > 0:
            B.mul_(1 - shrink)
        B.diagonal().copy_(diag_H[idx])
        return B

    # a float64 sum of float32-range values cannot overflow: it is non-finite exactly when some entry is,
    # and unlike isfinite(H) it allocates nothing
    if not bool(torch.isfinite(H.sum(dtype=torch.float64))):
        raise FormatError("the Hessian holds NaN or Inf values (non-finite calibration activations)")
    in_place = H.device.type == "cpu"
    B = permuted(reverse=in_place)
    mean = diag_H.mean()
    for retry in range(DAMP_RETRIES + 1):
        if retry:
            B = permuted(reverse=in_place)
        if damp > 0:
            B.diagonal().add_(damp * mean)
        if in_place:
            U = _inverse_cholesky_upper_inplace(B)
        else:
            try:
                U = inverse_cholesky_upper(B).float()
            except torch.linalg.LinAlgError:
                U = None
        del B
        if U is None:
            if retry == DAMP_RETRIES:
                raise FormatError(f"the Hessian is not positive definite even with damping {damp:g} "
                                  f"(after {DAMP_RETRIES} retries)") from None
            damp = damp * 10 if damp > 0 else 1e-6
            continue
        if retry and info is not None:
            info.update(damp=damp, damp_retries=retry)
        return dead, perm, U


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = False,
                  act_order: bool = True, damp: float = 0.01, block_size: int = 128, mse: bool = False,
                  shrink: float = 0.0, factor=None, mse_step: int = 1):
    """GPTQ on ``W [out, in]`` with Hessian ``H [in, in]``.

    ``shrink`` (β) pulls H toward its diagonal, ``H ← (1 − β)H + β·diag(H)``, before damping:
    the cross-channel correlations of a narrow calibration corpus are what GPTQ's error
    compensation exploits and what other text does not share (β = 1 is RTN in act order).

    Returns ``(q, scales, zeros, g_idx, losses)``: codes in the original column order,
    per-group grids (group ``k`` = permuted columns ``k·g … k·g+g−1``), ``g_idx`` (None
    without act_order) and the per-column losses ``(w − q)² / (2 [H⁻¹]_cc)`` whose sum
    equals ``tr(E H Eᵀ)/2`` for the damped H. ``factor``: ``hessian_factor(H, …)`` computed
    once for several layers with the same H and settings.
    """
    W = W.clone().float()
    out, cols = W.shape
    maxq = 2**bits - 1
    g = cols if group_size == -1 else group_size
    n_groups = math.ceil(cols / g)

    dead, perm, Hinv = factor if factor is not None else hessian_factor(H, act_order, damp, shrink)
    W[:, dead] = 0
    if perm is not None:
        W = W[:, perm]

    # columns are rows here (Q, Err and the lazy block are kept transposed), so the per-column
    # rank-1 updates touch contiguous memory: 2× faster on 1536-row layers than strided columns
    QT = W.new_zeros(cols, out)
    ErrT = W.new_zeros(cols, out)  # (w − q)/d per column: the loss of a column is err²/2
    scales = torch.zeros(out, n_groups)
    zeros = torch.zeros(out, n_groups)
    if group_size == -1:
        scale, zero = find_params(W, bits, sym, mse, step=mse_step)
        scales[:, 0], zeros[:, 0] = scale, zero
    diag = Hinv.diagonal().tolist()
    on_cpu = W.device.type == "cpu" and W.dtype == torch.float32
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1T = W[:, i1:i2].T.contiguous()
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group_size != -1 and col % g == 0:
                # the grid of a group comes from the current, error-updated weights; columns
                # past this lazy block get the pending updates applied first
                hi = min(col + g, cols)
                current = W1T[i:min(hi, i2) - i1].T
                if hi > i2:
                    pending = W[:, i2:hi] - ErrT[i1:col].T @ Hinv[i1:col, i2:hi]
                    current = torch.cat([current, pending], 1)
                scale, zero = find_params(current, bits, sym, mse, step=mse_step)
                scales[:, col // g], zeros[:, col // g] = scale, zero
            _quantize_column(W1T[i], QT[col], ErrT[col], scale, zero, maxq, diag[col], on_cpu)
            W1T[i:].addr_(Hinv1[i, i:], ErrT[col], alpha=-1)
        W[:, i2:].addmm_(ErrT[i1:i2].T, Hinv[i1:i2, i2:], alpha=-1)
    del W
    ErrT.square_().div_(2)
    g_idx = None
    if perm is not None:  # back to the original column order, one gather each, the transposed copies freed first
        inv = torch.argsort(perm)
        Q = QT.T.index_select(1, inv)
        del QT
        losses = ErrT.T.index_select(1, inv)
        g_idx = (torch.arange(cols) // g)[inv]
    else:
        Q = QT.T.contiguous()
        del QT
        losses = ErrT.T.contiguous()
    return Q, scales, zeros, g_idx, losses


class GPTQ(Quantizer):
    """GPTQ with damping, dead columns, act-order (g_idx), groups and an optional MSE grid."""

    name = "gptq"
    Config = GPTQConfig
    needs = frozenset({"hessian"})

    def __init__(self, config=None):
        super().__init__(config)
        self._factor = None  # (H, hessian_factor of H): H kept alive so its identity stays unique

    def format_for(self, shape) -> GPTQFormat:
        c = self.config
        return GPTQFormat(GPTQParams(bits=c.bits, group_size=c.group_size, act_order=c.act_order))

    def estimate(self, task: LayerTask) -> torch.Tensor:
        """GPTQ's Ŵ when only the diagonal of H is known (no error feedback between columns): round to
        nearest on its grid, groups in act order; equals ``quantize`` when H is diagonal."""
        c = self.config
        W = task.W.detach().float().clone()
        d = torch.diag(task.stats.H) if task.stats.H is not None else torch.ones(W.shape[1])
        W[:, d == 0] = 0
        d = torch.where(d == 0, torch.ones_like(d), d)
        perm = torch.argsort(d, descending=True, stable=True) if c.act_order else torch.arange(W.shape[1])
        q, s, z = rtn_quantize(W[:, perm], c.bits, c.group_size, c.sym, c.mse, c.mse_step)
        g = W.shape[1] if c.group_size == -1 else c.group_size
        group = torch.arange(W.shape[1]) // g
        return (s[:, group] * (q - z[:, group]))[:, torch.argsort(perm)]

    def quantize(self, task: LayerTask) -> Compressed:
        _check_finite(task)
        if task.stats.H is None:
            raise ValueError(f"{task.name}: gptq needs the 'hessian' statistic")
        c = self.config
        H = task.stats.H
        if self._factor is None or self._factor[0] is not H:  # q/k/v (and gate/up) share one LayerStats
            self._factor, retried = None, {}  # the last group's factor goes before this one is made
            try:
                self._factor = (H, hessian_factor(H, c.act_order, c.damp, c.shrink, retried), retried)
            except FormatError as exc:
                raise FormatError(f"{task.name}: {exc}") from None
        q, s, z, g_idx, losses = gptq_quantize(task.W, H, c.bits, c.group_size, c.sym, c.act_order,
                                               c.damp, c.block_size, c.mse, c.shrink, factor=self._factor[1],
                                               mse_step=c.mse_step)
        result = _pack(task, q, s, z, c.bits, c.group_size, g_idx)
        result.info["loss"] = float(losses.sum())
        result.info.update(self._factor[2])  # the damping actually used, when H needed more (stage report)
        return result
