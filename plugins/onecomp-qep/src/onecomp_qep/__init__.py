"""Quantization error propagation (Arai & Ichikawa, 2025) as a layer-scope onecomp refiner."""

from .qep import QEP, QEPConfig, qep_correct

__all__ = ["QEP", "QEPConfig", "qep_correct"]
