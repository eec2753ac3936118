"""The pipeline: plan → layer-wise stage (pivot) → later stages → reports."""

from .run import StageContext, run

__all__ = ["StageContext", "run"]
