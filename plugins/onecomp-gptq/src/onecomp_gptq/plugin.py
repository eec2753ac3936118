"""Entry point: registers the quantizers ``gptq`` and ``rtn`` and the format ``gptq``."""

from onecomp import hookimpl

from .format import GPTQFormat
from .quantizers import GPTQ, RTN


@hookimpl
def register_quantizers(register):
    register(GPTQ)
    register(RTN)


@hookimpl
def register_formats(register):
    register(GPTQFormat)
