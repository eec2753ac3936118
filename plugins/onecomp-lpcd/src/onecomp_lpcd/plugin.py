"""Entry point: registers the refiner ``lpcd``."""

from onecomp import hookimpl

from .lpcd import LPCD


@hookimpl
def register_refiners(register):
    register(LPCD)
