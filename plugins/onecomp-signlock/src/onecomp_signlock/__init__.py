"""Sign lock-in (gap initialisation + outward-drift penalty) as a onecomp regularizer."""

from .signlock import SignLock, SignLockConfig

__all__ = ["SignLock", "SignLockConfig"]
