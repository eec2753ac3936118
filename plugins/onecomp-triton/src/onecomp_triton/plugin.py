"""Entry point: registers the backend ``triton`` (triton itself is imported only on a kernel's first launch)."""

from onecomp import hookimpl

from .backend import TritonBackend


@hookimpl
def register_backends(register):
    register(TritonBackend)
