"""Entry point: registers the quantizer ``mdbf`` and the format ``mdbf``."""

from onecomp import hookimpl

from .format import MDBFFormat
from .quantizer import MDBF


@hookimpl
def register_quantizers(register):
    register(MDBF)


@hookimpl
def register_formats(register):
    register(MDBFFormat)
