"""Calibration text, token windows, and sequential capture of layer-input statistics."""

from .capture import (BlockInputs, SequentialCapture, StatsCollector, capture_block, first_block_inputs, propagate,
                      propagate_, run_block, stages_supported)
from .corpus import calibration_windows, leading_windows, load_text, sample_windows, tokenize
from .sensitivity import output_grad_squares

__all__ = ["BlockInputs", "SequentialCapture", "StatsCollector", "capture_block", "first_block_inputs", "propagate",
           "propagate_", "run_block", "stages_supported", "calibration_windows", "leading_windows", "load_text",
           "sample_windows", "tokenize", "output_grad_squares"]
