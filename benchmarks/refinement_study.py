"""Does a better fit make l = 2 beat DBF (l = 1) at matched bits per weight? (the MDBF README, "MDBF versus DBF")

    python benchmarks/refinement_study.py          # prints one line per fit

On block 3 of SmolLM2-135M (q_proj, k_proj, gate_proj, down_proj) at 1.0, 1.5 and 2.0 bpw, fits
P = 1 with the quantizer's rank rule (l = 1 at r₁, l = 2 at r₂ ≤ r₁) and l = 2 at the equal rank r₁,
15 rounds, unweighted, then applies two post-fit refinements to every fit alike:

- ``env``: 3 sweeps of exact ridge least squares of the envelopes with the signs fixed (A, then
  Q_U with G fixed; B, then Q_V with F fixed);
- ``sign+env``: 3 sweeps of exact column-wise sign flips (for each column of S_A, every row's flip
  that lowers ‖W − F G‖² given the other columns; likewise S_B) followed by one envelope sweep.

Both are monotone; they are not part of the fitter (measured: they help l = 1 and l = 2 alike).
Also prints how low-rank the magnitudes are: the share of ‖|F_ls|‖² left by a rank-l TSVD, where
F_ls is the unconstrained least-squares F for a fitted G.
"""

from __future__ import annotations

import time

import torch

from onecomp_mdbf import bits_per_weight, fit_term, rank_for
from onecomp_mdbf.factorize import TINY, Term

LAYERS = ["self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj"]
TARGETS = (1.0, 1.5, 2.0)


def _solve(M, b, ridge):
    M, b = M.double(), b.double()
    d = M.diagonal(dim1=-2, dim2=-1)
    M = M + torch.diag_embed((ridge * d.mean(-1, keepdim=True).clamp_min(TINY)).expand_as(d))
    return torch.linalg.solve(M, b.unsqueeze(-1)).squeeze(-1).float()


def outer_step(S, Q, H, C, ridge):
    """Best A for ``W ≈ (S ⊙ A Qᵀ) G`` given ``H = G Gᵀ``, ``C = W Gᵀ``: one l×l system per row."""
    l = Q.shape[1]
    P = [S * Q[:, t] for t in range(l)]
    PH = [p @ H for p in P]
    M = torch.stack([torch.stack([(PH[t] * P[u]).sum(1) for u in range(l)], -1) for t in range(l)], -2)
    return _solve(M, torch.stack([(p * C).sum(1) for p in P], -1), ridge)


def middle_step(S, A, H, C, ridge):
    """Best Q for ``W ≈ (S ⊙ A Qᵀ) G``: one (l·r)×(l·r) system, blocks (Sᵀ diag(a_t a_u) S) ⊙ H."""
    r, l = S.shape[1], A.shape[1]
    M = torch.cat([torch.cat([(S.T @ (S * (A[:, t] * A[:, u])[:, None])) * H for u in range(l)], 1)
                   for t in range(l)], 0)
    SC = S * C
    q = _solve(M, torch.cat([SC.T @ A[:, t] for t in range(l)]), ridge)
    return q.view(l, r).T.contiguous()


def refine_envelopes(W, term, sweeps=3, ridge=1e-6):
    S_A, A, Q_U, S_B, Q_V, B = term
    for _ in range(sweeps):
        G = S_B * (Q_V @ B.T)
        H, C = G @ G.T, W @ G.T
        A = outer_step(S_A, Q_U, H, C, ridge)
        Q_U = middle_step(S_A, A, H, C, ridge)
        F = S_A * (A @ Q_U.T)
        H, C = F.T @ F, W.T @ F
        B = outer_step(S_B.T, Q_V, H, C, ridge)
        Q_V = middle_step(S_B.T, B, H, C, ridge)
    return Term(S_A, A, Q_U, S_B, Q_V, B)


def sign_sweep(W, S, E, G):
    """Column by column, flip every sign of ``F = S ⊙ E`` that lowers ‖W − F G‖² (rows are independent)."""
    F, H = S * E, G @ G.T
    RG, hd, S = W @ G.T - F @ H, H.diagonal(), S.clone()
    for j in range(S.shape[1]):
        delta = -2 * F[:, j]
        flip = -2 * delta * RG[:, j] + delta.square() * hd[j] < 0
        d = torch.where(flip, delta, torch.zeros_like(delta))
        S[:, j] = torch.where(flip, -S[:, j], S[:, j])
        F[:, j] += d
        RG -= d[:, None] * H[j][None, :]
    return S


def refine_signs(W, term, sweeps=3):
    for _ in range(sweeps):
        S_A, A, Q_U, S_B, Q_V, B = term
        S_A = sign_sweep(W, S_A, A @ Q_U.T, S_B * (Q_V @ B.T))
        S_B = sign_sweep(W.T, S_B.T.contiguous(), B @ Q_V.T, (S_A * (A @ Q_U.T)).T).T.contiguous()
        term = refine_envelopes(W, Term(S_A, A, Q_U, S_B, Q_V, B), 1)
    return term


def main():
    from onecomp.models import load_model

    torch.set_num_threads(1)
    block = load_model("smollm2-135m").model.model.layers[3]
    for name in LAYERS:
        W = block.get_submodule(name).weight.detach().float()
        n, m = W.shape
        W_sq = float(W.square().sum())
        rel = lambda term: float((W - term.W()).square().sum()) / W_sq  # noqa: E731
        for target in TARGETS:
            r1, r2 = rank_for(n, m, 1, 1, target), rank_for(n, m, 2, 1, target)
            for l, r in [(1, r1), (2, r2), (2, r1)]:
                t0 = time.perf_counter()
                term, history = fit_term(W, r, l, 15)
                t1 = time.perf_counter()
                e_env = rel(refine_envelopes(W, term))
                t2 = time.perf_counter()
                e_sign = rel(refine_signs(W, term))
                t3 = time.perf_counter()
                print(f"3.{name} {target} l={l} r={r} bpw={bits_per_weight(n, m, r, l, 1):.4f} "
                      f"admm={min(history) / W_sq:.4f} env={e_env:.4f} sign+env={e_sign:.4f} "
                      f"t_fit={t1 - t0:.1f}s t_env={t2 - t1:.1f}s t_sign={t3 - t2:.1f}s", flush=True)
        r = rank_for(n, m, 1, 1, 1.5)
        G = fit_term(W, r, 2, 15)[0].G()
        HG = G @ G.T
        F_ls = torch.linalg.solve(HG + 1e-6 * float(HG.diagonal().mean()) * torch.eye(r), G @ W.T).T
        sv = torch.linalg.svdvals(F_ls.abs()).square()
        print(f"3.{name} r={r}: share of ‖|F_ls|‖² beyond a rank-l envelope, l = 1, 2, 4, 8:",
              [round(float(sv[k:].sum() / sv.sum()), 4) for k in (1, 2, 4, 8)], flush=True)


if __name__ == "__main__":
    main()
