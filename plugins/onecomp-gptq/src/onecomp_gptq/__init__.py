"""GPTQ (Frantar et al., 2022) and round-to-nearest quantizers, and the packed integer ``gptq`` format."""

from .format import GPTQFormat, pack_codes, unpack_codes
from .grid import fake_quantize, find_params
from .quantizers import GPTQ, RTN, gptq_quantize

__all__ = ["GPTQFormat", "pack_codes", "unpack_codes", "fake_quantize", "find_params", "GPTQ", "RTN", "gptq_quantize"]
