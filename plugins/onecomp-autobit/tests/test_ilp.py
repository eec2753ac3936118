"""The AutoBit ILP against brute force, its budget, monotonicity and infeasibility (hypothesis)."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from onecomp_autobit.ilp import InfeasibleBudget, smallest_budget, solve, total


@st.composite
def problems(draw, max_groups=6, max_candidates=4):
    G = draw(st.integers(1, max_groups))
    K = draw(st.integers(1, max_candidates))
    cost = np.array(draw(st.lists(st.lists(st.floats(0, 1e3, allow_nan=False), min_size=K, max_size=K),
                                  min_size=G, max_size=G)))
    bits = np.array(draw(st.lists(st.lists(st.integers(1, 10**6), min_size=K, max_size=K), min_size=G, max_size=G)))
    if draw(st.booleans()):  # some candidates not allowed, at least one per group
        mask = np.array(draw(st.lists(st.lists(st.booleans(), min_size=K, max_size=K), min_size=G, max_size=G)))
        mask[np.arange(G), np.array(draw(st.lists(st.integers(0, K - 1), min_size=G, max_size=G)))] = True
        cost = np.where(mask, cost, np.inf)
    lo, hi = smallest_budget(bits, np.isfinite(cost)), int(bits.sum())
    return cost, bits, lo, hi


def brute_force(cost, bits, budget):
    """The least total cost over every choice within the budget (None if none fits)."""
    best = None
    for choice in itertools.product(*[range(cost.shape[1])] * cost.shape[0]):
        choice = np.array(choice)
        if np.isfinite(cost[np.arange(len(choice)), choice]).all() and total(bits, choice) <= budget:
            c = total(cost, choice)
            best = c if best is None else min(best, c)
    return best


def tolerance(cost):
    return 1e-6 * float(np.abs(cost[np.isfinite(cost)]).max() or 1) * cost.shape[0]


@settings(max_examples=60, deadline=None)
@given(problems(), st.floats(0, 1))
def test_matches_brute_force(problem, where):
    cost, bits, lo, hi = problem
    budget = lo + int(where * (hi - lo))
    choice = solve(cost, bits, budget)
    assert total(bits, choice) <= budget  # exact integer arithmetic
    assert np.isfinite(cost[np.arange(len(choice)), choice]).all()
    assert total(cost, choice) <= brute_force(cost, bits, budget) + tolerance(cost)


@settings(max_examples=40, deadline=None)
@given(problems(), st.floats(0, 1), st.floats(0, 1))
def test_more_budget_never_costs_more(problem, a, b):
    cost, bits, lo, hi = problem
    small, large = sorted((lo + int(a * (hi - lo)), lo + int(b * (hi - lo))))
    assert total(cost, solve(cost, bits, large)) <= total(cost, solve(cost, bits, small)) + tolerance(cost)


@settings(max_examples=30, deadline=None)
@given(problems(), st.integers(1, 10**5))
def test_infeasible_budget_names_the_smallest(problem, short):
    cost, bits, lo, hi = problem
    with pytest.raises(InfeasibleBudget) as info:
        solve(cost, bits, lo - short)
    assert info.value.smallest == lo
    assert brute_force(cost, bits, lo) is not None and brute_force(cost, bits, lo - 1) is None


def test_budget_holds_exactly_at_its_edge():
    """With large bit counts the solver's tolerance must not let a choice slip over by a few bits."""
    bits = np.array([[10**8 + 1, 3 * 10**8], [10**8, 3 * 10**8 + 7]])
    cost = np.array([[5.0, 1.0], [5.0, 1.0]])
    budget = 4 * 10**8 + 6  # one of the two big candidates fits, both together (by 1 bit) do not
    choice = solve(cost, bits, budget)
    assert total(bits, choice) <= budget and total(cost, choice) == 6.0
