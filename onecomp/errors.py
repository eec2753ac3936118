"""Errors raised at onecomp's edges; each names what was wrong and what is allowed."""

from __future__ import annotations


class OneCompError(Exception):
    """Base class of every error onecomp raises on purpose."""


class ConfigError(OneCompError, ValueError):
    """A configuration value is wrong; the message starts with its path (``refiners[1].alpha``)."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)

    def under(self, prefix: str) -> "ConfigError":
        """The same error with ``prefix`` put in front of its path."""
        path = f"{prefix}.{self.path}" if self.path and not self.path.startswith("[") else f"{prefix}{self.path}"
        return ConfigError(path, self.message)


class UnknownComponent(OneCompError, LookupError):
    """No installed plugin provides a component of this kind and name."""


class DuplicateComponent(OneCompError):
    """Two plugins register a component of one kind under one name."""


class FormatError(OneCompError, ValueError):
    """Stored tensors or params do not fit their format."""


class CheckpointError(OneCompError):
    """A checkpoint directory is incomplete, corrupted or needs a missing plugin."""


class ModelLoadError(OneCompError):
    """A model could not be found or loaded."""


class RunError(OneCompError):
    """A pipeline run cannot start or go on (its output directory holds another run, nothing to resume)."""
