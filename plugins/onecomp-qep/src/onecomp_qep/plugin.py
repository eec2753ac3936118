"""Entry point: registers the refiner ``qep``."""

from onecomp import hookimpl

from .qep import QEP


@hookimpl
def register_refiners(register):
    register(QEP)
