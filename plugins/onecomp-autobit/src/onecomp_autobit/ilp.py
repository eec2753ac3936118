"""The AutoBit integer linear program: one candidate per fused group, total bits within a budget.

    minimise   Σ_g Σ_k c_gk x_gk
    subject to Σ_k x_gk = 1 for every group g,   x_gk ∈ {0, 1}
               Σ_g Σ_k b_gk x_gk ≤ B

solved exactly (relative gap 0) with ``scipy.optimize.milp`` (HiGHS). Bits are integers and the
returned choice is checked against the budget in exact integer arithmetic.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


class InfeasibleBudget(ValueError):
    """No choice fits the budget; ``smallest`` is the least budget (bits) that any choice needs."""

    def __init__(self, budget: int, smallest: int):
        self.budget, self.smallest = budget, smallest
        super().__init__(f"budget {budget} bits is below the smallest feasible {smallest} bits")


def smallest_budget(bits: np.ndarray, allowed: np.ndarray) -> int:
    """Σ_g min_k b_gk over the allowed candidates: every group at its cheapest one."""
    return sum(int(min(int(b) for b, ok in zip(row, oks) if ok)) for row, oks in zip(bits, allowed))


def total(values: np.ndarray, choice) -> float | int:
    """Σ_g values[g, choice[g]] (exact for integer bits)."""
    return sum(v.item() for v in values[np.arange(len(choice)), choice])


def solve(cost: np.ndarray, bits: np.ndarray, budget: int, time_limit: float | None = None) -> np.ndarray:
    """The choice ``[G]`` (candidate index per group) of least total cost whose bits stay within
    ``budget``. ``cost`` and ``bits`` are ``[G, K]``; an infinite cost marks a candidate not allowed."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array, kron, eye

    cost = np.asarray(cost, dtype=np.float64)
    bits = np.asarray(bits, dtype=np.int64)
    G, K = cost.shape
    allowed = np.isfinite(cost)
    if not allowed.any(axis=1).all():
        raise ValueError(f"group {int(np.argmin(allowed.any(axis=1)))} has no allowed candidate")
    smallest = smallest_budget(bits, allowed)
    if smallest > budget:
        raise InfeasibleBudget(budget, smallest)
    scale = float(np.abs(cost[allowed]).max()) or 1.0
    c = np.where(allowed, cost / scale, 0.0).ravel()
    one_each = LinearConstraint(csr_array(kron(eye(G), np.ones((1, K)))), 1, 1)
    row = (bits / max(budget, 1)).ravel()[None, :]
    bounds = Bounds(0, allowed.ravel().astype(float))
    rhs = 1.0
    options = {"mip_rel_gap": 0.0, **({"time_limit": time_limit} if time_limit else {})}
    for _ in range(8):
        res = milp(c, integrality=np.ones_like(c), bounds=bounds,
                   constraints=[one_each, LinearConstraint(row, -np.inf, rhs)], options=options)
        if res.x is None:
            raise RuntimeError(f"the MILP solver failed: {res.message}")
        if res.status != 0:  # a limit was hit: the best choice found, not proven least
            log.warning("autobit: the MILP solver stopped early (%s); the plan may not be optimal", res.message)
        choice = res.x.reshape(G, K).argmax(axis=1)
        used = total(bits, choice)
        if used <= budget:
            return choice
        rhs -= (used - budget + 0.5) / max(budget, 1)  # the solver's feasibility tolerance let it slip over
    raise RuntimeError("the MILP solver kept returning choices over the budget")
