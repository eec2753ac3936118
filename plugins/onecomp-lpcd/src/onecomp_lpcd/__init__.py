"""Layer-projected coordinate descent (Ichikawa, Fujimoto and Sakai, 2025) as a block-scope onecomp refiner."""

from .lpcd import LPCD, LPCDConfig, SUBMODULES, closed_form_target, step_objective

__all__ = ["LPCD", "LPCDConfig", "SUBMODULES", "closed_form_target", "step_objective"]
