"""Calibration text, token windows, and sequential capture of layer-input statistics."""

from .capture import (BlockInputs, StatsCollector, capture_block, first_block_inputs, propagate, propagate_,
                      run_block)
from .corpus import calibration_windows, leading_windows, load_text, sample_windows, tokenize

__all__ = ["BlockInputs", "StatsCollector", "capture_block", "first_block_inputs", "propagate", "propagate_",
           "run_block", "calibration_windows", "leading_windows", "load_text", "sample_windows", "tokenize"]
