"""The pipeline: plan → layer-wise stage (pivot) → later stages → reports."""

from .run import compress, run

__all__ = ["compress", "run"]
