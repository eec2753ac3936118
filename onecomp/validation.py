"""attrs validation shared by every config: range and choice validators, and ``build_config``.

A leaf module (it imports only ``errors``), so components, the registry and the pipeline
config can all use it without importing each other. Every error names its field.
"""

from __future__ import annotations

import math
import typing
from typing import Any, Mapping

import attrs

from .errors import ConfigError


def in_range(lo=None, hi=None, *, lo_open=False, hi_open=False):
    """attrs validator: ``lo <= value <= hi`` (bounds optional, open if asked); NaN is refused."""

    def check(inst, attribute, value):
        nan = isinstance(value, float) and math.isnan(value)
        bad = nan or (lo is not None and (value <= lo if lo_open else value < lo)) or \
            (hi is not None and (value >= hi if hi_open else value > hi))
        if bad or isinstance(value, bool):
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            raise ConfigError(attribute.name, f"must be in {left}{'-inf' if lo is None else lo}, "
                                              f"{'inf' if hi is None else hi}{right}, got {value!r}")

    return check


def one_of(*allowed):
    """attrs validator: value is one of ``allowed``."""

    def check(inst, attribute, value):
        if value not in allowed:
            raise ConfigError(attribute.name, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")

    return check


def positive(inst, attribute, value):
    """attrs validator: a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(attribute.name, f"must be a positive integer, got {value!r}")


def finite(inst, attribute, value):
    """attrs validator: a finite number (every float field gets this check from ``build_config``)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(attribute.name, f"must be a finite number, got {value!r}")


_SIMPLE = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def check_type(cls, attribute, value, path: str):
    """Check a raw value against an attrs field's annotated type where it is a simple one;
    float fields also refuse NaN and infinities."""
    typ = attribute.type
    if isinstance(typ, str):
        try:
            typ = typing.get_type_hints(cls)[attribute.name]
        except Exception:
            return value
    if typ is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"must be a list, got {value!r}")
        return value
    if typ in _SIMPLE:
        ok = (isinstance(value, typ) and not (typ is int and isinstance(value, bool))) or \
             (typ is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise ConfigError(path, f"must be {_SIMPLE[typ]}, got {value!r}")
        if typ is float:
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(path, f"must be a finite number, got {value!r}")
        return value
    return value


def build_config(cls, params: Mapping[str, Any], path: str = ""):
    """Instantiate attrs class ``cls`` from ``params``; errors name ``path.field`` and allowed keys."""
    if not isinstance(params, Mapping):
        raise ConfigError(path, f"must be a table, got {params!r}")
    fields = {a.name: a for a in attrs.fields(cls)}
    bad_keys = [k for k in params if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(path, f"keys must be strings, got {bad_keys[0]!r}")
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}" if path else unknown[0],
                          f"unknown key; allowed: {', '.join(fields) if fields else 'none'}")
    kwargs = {}
    for key, value in params.items():
        sub = f"{path}.{key}" if path else key
        kwargs[key] = check_type(cls, fields[key], value, sub)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise exc.under(path) if path else exc from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(path, str(exc)) from None
