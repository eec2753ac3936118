"""Entry point (``[project.entry-points.onecomp] example = "onecomp_example.plugin"``).

One ``@hookimpl`` per component kind; each calls ``register`` once per class.
"""

from onecomp import hookimpl

from .format import ExampleInt8
from .quantizer import ExampleAbsmax


@hookimpl
def register_quantizers(register):
    register(ExampleAbsmax)


@hookimpl
def register_formats(register):
    register(ExampleInt8)
