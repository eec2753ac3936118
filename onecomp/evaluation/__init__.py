"""Perplexity exactly as docs/protocol.md defines it."""

from .perplexity import eval_windows, perplexity

__all__ = ["eval_windows", "perplexity"]
