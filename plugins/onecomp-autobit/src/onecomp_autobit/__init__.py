"""AutoBit for onecomp: mixed precision per layer under a bit or memory budget, by integer linear programming."""

from .ilp import InfeasibleBudget, smallest_budget, solve
from .planner import AutoBit, AutoBitConfig, default_candidates

__all__ = ["AutoBit", "AutoBitConfig", "InfeasibleBudget", "default_candidates", "smallest_budget", "solve"]
