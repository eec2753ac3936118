"""Entry point: registers the regularizer ``signlock``."""

from onecomp import hookimpl

from .signlock import SignLock


@hookimpl
def register_regularizers(register):
    register(SignLock)
