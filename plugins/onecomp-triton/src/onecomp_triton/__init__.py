"""Backend ``triton`` for onecomp: fused dequantize-matmul Triton kernels for the ``gptq`` and ``mdbf`` formats.

Importing the package does not import triton; ``onecomp_triton.kernels`` does.
"""

from .backend import TritonBackend, TritonConfig, TritonGPTQLinear, TritonLinear, TritonMDBFLinear
from .reference import reference_linear

__all__ = ["TritonBackend", "TritonConfig", "TritonLinear", "TritonGPTQLinear", "TritonMDBFLinear",
           "reference_linear"]
