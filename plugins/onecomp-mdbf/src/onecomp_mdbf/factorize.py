"""Fitting MDBF factors to a matrix: closed-form SVD initialisation, then alternating ADMM.

One term approximates ``W ≈ F G`` with ``F = S_A ⊙ (A Q_Uᵀ)`` ``[n, r]`` and ``G = S_B ⊙ (Q_V Bᵀ)``
``[r, m]``. Both factors live in ``C_l = {S ⊙ (L Rᵀ)}``: a sign matrix times a rank-``l``
envelope. Each outer iteration solves for one factor with the other fixed by a few iterations
of scaled ADMM on ``min ‖T − X Z‖² + reg‖Z‖²`` s.t. ``Z ∈ C_l``, whose projection is
``Π_l(Y) = sign(Y) ⊙ TSVD_l(|Y|)`` (Boža & Macko 2025 for l = 1; the MDBF paper for l > 1).
P terms are fitted greedily, each on the residual of the ones before.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

TINY = 1e-30


class Term(NamedTuple):
    """One term ``F G`` of the sum, fp32 factors."""

    S_A: torch.Tensor  # [n, r] ±1
    A: torch.Tensor  # [n, l]
    Q_U: torch.Tensor  # [r, l]
    S_B: torch.Tensor  # [r, m] ±1
    Q_V: torch.Tensor  # [r, l]
    B: torch.Tensor  # [m, l]

    def F(self) -> torch.Tensor:
        return self.S_A * (self.A @ self.Q_U.T)

    def G(self) -> torch.Tensor:
        return self.S_B * (self.Q_V @ self.B.T)

    def W(self) -> torch.Tensor:
        return self.F() @ self.G()


def bits_per_weight(n: int, m: int, r: int, l: int, P: int) -> float:
    """The format's formula: P·[r(n+m) + 16·l(n+m+2r)]/(nm)."""
    return P * (r * (n + m) + 16 * l * (n + m + 2 * r)) / (n * m)


def rank_for(n: int, m: int, l: int, P: int, target: float) -> int:
    """The largest middle rank r whose formula bits per weight stay within ``target`` (0 if none)."""
    r = max(0, math.floor((target * n * m / P - 16 * l * (n + m)) / (n + m + 32 * l)))
    while bits_per_weight(n, m, r + 1, l, P) <= target:
        r += 1
    while r > 0 and bits_per_weight(n, m, r, l, P) > target:
        r -= 1
    return r


def _orth(X: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of X's columns (a unit vector for one column, never zero)."""
    if X.shape[1] == 1:
        size = X.norm()
        return X / size if size > 0 else torch.full_like(X, X.shape[0] ** -0.5)
    return torch.linalg.qr(X).Q


def project(Y: torch.Tensor, l: int, V: torch.Tensor, iters: int = 2):
    """``Π_l(Y) = sign(Y) ⊙ TSVD_l(|Y|)`` for ``Y [a, k]``: returns ``(S, L, R, V)`` with
    ``Π_l(Y) = S ⊙ (L Rᵀ)``. The TSVD is ``iters`` subspace iterations from the right basis
    ``V [k, l]`` (a warm start: the basis the previous call returned)."""
    S = torch.copysign(torch.ones(()), Y)  # ±1; sign(0) counts as +1 (−0 as −1)
    M = Y.abs()
    for _ in range(iters):
        V = _orth(M.T @ _orth(M @ V))
    L = _orth(M @ V)
    return S, L, M.T @ L, V


def start_basis(k: int, l: int, gen: torch.Generator) -> torch.Tensor:
    """A right basis to start subspace iteration: the all-ones vector (the Perron direction of a
    positive matrix is close to it) and seeded random columns."""
    V = torch.randn(k, l, generator=gen)
    V[:, 0] = 1.0
    return _orth(V)


def admm(Xt, T, T_sq, Z, U, V, l: int, rho: float, reg: float, inner: int):
    """Scaled ADMM for ``min ‖T − Xtᵀ Z‖² + reg·‖Z‖²`` over ``Z ∈ C_l``, warm-started from ``(Z, U)``.

    ``Xt [r, a]`` has unit rows, so ``reg`` and ``rho`` are relative to the diagonal of ``Xt Xtᵀ``.
    Returns the projected iterate as ``(S, L, R)``, the new ``Z``, dual ``U``, basis ``V`` and
    the error ``‖T − Xtᵀ Z‖²`` (from ``Xt Xtᵀ`` and ``Xt T``, without forming the product).
    """
    XX = Xt @ Xt.T
    XT = Xt @ T
    H = XX.clone()
    H.diagonal().add_(reg * float(XX.diagonal().mean()) + rho)
    H_inv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    for _ in range(inner):
        Y = (H_inv @ Z.sub_(U).mul_(rho).add_(XT)).add_(U)  # Z_ls + U with Z_ls = H⁻¹(XT + ρ(Z − U))
        S, L, R, V = project(Y, l, V)
        Z = S * (L @ R.T) if l > 1 else (S * L).mul_(R.T)
        U = Y.sub_(Z)  # U + Z_ls − Z
    err = T_sq - 2 * torch.vdot(XT.flatten(), Z.flatten()) + torch.vdot(XX.flatten(), (Z @ Z.T).flatten())
    return (S, L, R), Z, U, V, float(err.clamp_min(0))


def init_svd(W: torch.Tensor, r: int, l: int, gen: torch.Generator) -> Term:
    """Closed form: ``F₀ = Π_l(U√Σ)``, ``G₀ = Π_l(√Σ Vᵀ)`` from the rank-r SVD of W: the signs of the
    scaled singular vectors and the rank-l SVD of their magnitudes. Components past ``min(n, m)``
    start as small seeded noise (they have no singular vector)."""
    n, m = W.shape
    U, sig, Vh = torch.linalg.svd(W, full_matrices=False)
    k = min(r, sig.numel())
    root = sig[:k].sqrt()
    F0 = torch.zeros(n, r)
    G0 = torch.zeros(r, m)
    F0[:, :k] = U[:, :k] * root
    G0[:k] = root[:, None] * Vh[:k]
    if r > k:
        eps = 1e-3 * float(root.mean()) / math.sqrt(max(n, m)) + TINY
        F0[:, k:] = torch.randn(n, r - k, generator=gen) * eps
        G0[k:] = torch.randn(r - k, m, generator=gen) * eps
    S, L, R, _ = project(F0.T, l, start_basis(n, l, gen), iters=8)
    S_B, Q_V, B, _ = project(G0, l, start_basis(m, l, gen), iters=8)
    return Term(S.T, R, L, S_B, Q_V, B)


def init_random(W: torch.Tensor, r: int, l: int, gen: torch.Generator) -> Term:
    """Baseline: random signs and constant envelopes, scaled by the least-squares factor α."""
    n, m = W.shape
    S_A = torch.randint(0, 2, (n, r), generator=gen).float() * 2 - 1
    S_B = torch.randint(0, 2, (r, m), generator=gen).float() * 2 - 1
    P0 = S_A @ S_B
    alpha = float((W * P0).sum() / P0.square().sum().clamp_min(TINY))
    a = abs(alpha) ** 0.25
    A, Q_U, Q_V, B = torch.zeros(n, l), torch.zeros(r, l), torch.zeros(r, l), torch.zeros(m, l)
    A[:, 0], Q_U[:, 0], Q_V[:, 0], B[:, 0] = math.copysign(a, alpha), a, a, a
    return Term(S_A, A, Q_U, S_B, Q_V, B)


def rho_at(t: int, iterations: int) -> float:
    """ADMM penalty warm-up: loose at first (0.03, close to free least squares, so signs can move),
    rising as sqrt(t/T) to 1 (measured on SmolLM2 layers: at 10 rounds as good as a cubic
    warm-up at 20)."""
    return 0.03 + 0.97 * math.sqrt(t / max(1, iterations - 1))


def fit_term(W: torch.Tensor, r: int, l: int, iterations: int, inner: int = 3, reg: float = 0.03,
             gen: torch.Generator | None = None, init: str = "svd", bar=None) -> tuple[Term, list[float]]:
    """Fit one term ``F G ≈ W`` (fp32 ``[n, m]``): init, then ``iterations`` alternating ADMM rounds.

    Each round solves for F with G's rows scaled to unit norm, then for G with F's columns
    scaled to unit norm (the scale moves into the factor being solved, so ``F G`` is kept).
    Returns the best term seen (by ``‖W − F G‖²``, the initial one included) and the error
    after the initialisation and after every round.
    """
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    n, m = W.shape
    t0 = (init_svd if init == "svd" else init_random)(W, r, l, gen)
    S_A, A, Q_U, S_B, Q_V, B = t0
    Ft, G = t0.F().T.contiguous(), t0.G()  # Fᵀ [r, n] and G [r, m], kept materialised
    S_At = S_A.T
    W_sq = W.square().sum()
    err = float((W - Ft.T @ G).square().sum())
    best, best_err, history = t0, err, [err]
    U_F, U_G = torch.zeros(r, n), torch.zeros(r, m)  # scaled duals of Fᵀ and G
    V_F, V_G = start_basis(n, l, gen), start_basis(m, l, gen)  # warm right bases of Π_l on Fᵀ and G
    for t in range(iterations):
        rho = rho_at(t, iterations)
        # F-step: G with unit rows; solve Wᵀ ≈ Gᵀ Fᵀ for Fᵀ ∈ C_l
        c = G.norm(dim=1).clamp_min(TINY)[:, None]
        G.div_(c), U_G.div_(c)
        Q_V = Q_V / c
        (S_At, Q_U, A), Ft, U_F, V_F, _ = admm(G, W.T, W_sq, Ft.mul_(c), U_F.mul_(c), V_F, l, rho, reg, inner)
        # G-step: F with unit columns; solve W ≈ F G for G ∈ C_l
        c = Ft.norm(dim=1).clamp_min(TINY)[:, None]
        Ft.div_(c), U_F.div_(c)
        Q_U = Q_U / c
        (S_B, Q_V, B), G, U_G, V_G, err = admm(Ft, W, W_sq, G.mul_(c), U_G.mul_(c), V_G, l, rho, reg, inner)
        history.append(err)
        if err < best_err:
            best, best_err = Term(S_At.T, A, Q_U, S_B, Q_V, B), err
        if bar is not None:
            bar.set_postfix_str(f"rel err {err / max(float(W_sq), TINY):.4f}")
            bar.update(1)
    return best, history


def balance(term: Term) -> Term:
    """Rescale the four envelopes to one RMS (``F G`` unchanged), so float16 neither over- nor underflows."""
    def rms(x):
        return float(x.square().mean().sqrt())

    S_A, A, Q_U, S_B, Q_V, B = term
    sizes = [rms(A), rms(Q_U), rms(Q_V), rms(B)]
    if min(sizes) <= 0 or not all(map(math.isfinite, sizes)):
        return term
    a, q_u, q_v, b = sizes
    f, g = math.sqrt(a * q_u), math.sqrt(q_v * b)  # per-side common size after inner balancing
    gamma = math.sqrt(g / f)
    return Term(S_A, A * (f / a) * gamma, Q_U * (f / q_u) * gamma, S_B, Q_V * (g / q_v) / gamma,
                B * (g / b) / gamma)


def to_half(term: Term) -> Term:
    """The term as stored: envelopes rounded to float16 (returned as fp32)."""
    return Term(*(t if i in (0, 3) else t.half().float() for i, t in enumerate(term)))


def importance_scales(diag: torch.Tensor | None, m: int) -> torch.Tensor:
    """Per input column ``sqrt(E[x²])``, normalised to RMS 1 and floored at 1e-4 (dead inputs keep a
    sliver of weight so their columns stay determined); all ones without statistics."""
    if diag is None:
        return torch.ones(m)
    s = diag.detach().float().clamp_min(0).sqrt()
    size = float(s.square().mean().sqrt())
    if not math.isfinite(size) or size <= 0:
        return torch.ones(m)
    return (s / size).clamp_min(1e-4)


def fit(W: torch.Tensor, r: int, l: int, P: int, iterations: int, inner: int = 3, reg: float = 0.03,
        scales: torch.Tensor | None = None, seed: int = 0, init: str = "svd", bar=None
        ) -> tuple[list[Term], dict]:
    """Fit P terms greedily to ``W`` weighted by input-column ``scales``: term p fits the weighted
    residual of terms 1 … p−1 as stored (fp16 envelopes). Returns the stored-precision terms of
    the unweighted W and a report (weighted relative error before/after per term)."""
    n, m = W.shape
    s = scales if scales is not None else torch.ones(m)
    gen = torch.Generator().manual_seed(seed)
    Ws = W * s  # weight input columns by importance
    residual = Ws.clone()
    W_sq = max(float(Ws.square().sum()), TINY)
    terms, report = [], {"init_rel_err": [], "rel_err": []}
    for p in range(P):
        term, history = fit_term(residual, r, l, iterations, inner, reg, gen, init, bar)
        S_A, A, Q_U, S_B, Q_V, B = term
        term = to_half(balance(Term(S_A, A, Q_U, S_B, Q_V, B / s[:, None])))  # unscale the input side
        terms.append(term)
        residual = residual - term.W() * s
        report["init_rel_err"].append(history[0] / W_sq)
        report["rel_err"].append(float(residual.square().sum()) / W_sq)
        log.debug("term %d: weighted rel err %.4f (init %.4f)", p, report["rel_err"][-1], history[0] / W_sq)
    return terms, report


def estimated_flops(n: int, m: int, r: int, l: int, P: int, iterations: int, inner: int) -> float:
    """Rough multiply-adds of a fit, to decide whether it deserves a progress bar."""
    per_round = 2 * r * n * m + r * r * (n + m) * (inner + 2) + 4 * inner * r * (n + m) * l
    return float(P * (iterations * per_round + n * m * min(n, m)))
