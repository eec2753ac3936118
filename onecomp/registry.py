"""The plugin registry: entry points of group ``onecomp`` → components by kind and name.

Nothing loads at import time; the first lookup loads. Each entry point has its own
error boundary (a broken plugin is recorded with its distribution, the rest load).
Two components of one kind with one name is an error naming both distributions.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import threading
from types import FunctionType
from contextlib import contextmanager
from importlib.metadata import entry_points
from typing import Iterable, Mapping

import attrs
import pluggy

from . import hookspecs
from .components import KINDS, PLANNER_NEEDS, REQUIRED, SCOPES, STATISTICS, ComponentSpec
from .errors import ConfigError, DuplicateComponent, UnknownComponent

GROUP = "onecomp"
BUILTINS = (
    "onecomp.builtin.dense",
    "onecomp.builtin.uniform",
    "onecomp.builtin.torch_backend",
    "onecomp.builtin.refiners",
)
NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
#: which first-party distribution (under plugins/) to install for a name not found locally
KNOWN_PROVIDERS = {
    ("quantizer", "gptq"): "onecomp-gptq",
    ("quantizer", "rtn"): "onecomp-gptq",
    ("format", "gptq"): "onecomp-gptq",
    ("refiner", "qep"): "onecomp-qep",
    ("quantizer", "mdbf"): "onecomp-mdbf",
    ("format", "mdbf"): "onecomp-mdbf",
    ("regularizer", "signlock"): "onecomp-signlock",
    ("backend", "triton"): "onecomp-triton",
    ("refiner", "lordba"): "onecomp-lordba",
    ("format", "lordba"): "onecomp-lordba",
    ("format", "lora"): "onecomp-lordba",
    ("planner", "autobit"): "onecomp-autobit",
    ("refiner", "lpcd"): "onecomp-lpcd",
}


@attrs.frozen
class Entry:
    """One registered component and where it came from."""

    kind: str
    name: str
    cls: type
    plugin: str
    dist: str
    version: str


@attrs.frozen
class PluginLoadError:
    """An entry point that failed to import or register."""

    plugin: str
    dist: str
    error: str


def _split_env(value: str | None) -> set[str] | None:
    if value is None:
        return None
    return {v.strip() for v in value.split(",") if v.strip()}


class Registry:
    """Components by kind and name, loaded lazily from built-ins and entry points."""

    def __init__(self, *, entry_points: bool = True, only: Iterable[str] | None = None,
                 blocked: Iterable[str] = (), builtins: bool = True):
        self._use_entry_points = entry_points
        self._only = set(only) if only is not None else None
        self._blocked = set(blocked)
        self._builtins = builtins
        self._entries: dict[tuple[str, str], Entry] | None = None
        self._errors: list[PluginLoadError] = []
        self._lock = threading.Lock()
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        if os.environ.get("ONECOMP_TRACE_PLUGINS"):
            self.pm.trace.root.setwriter(print)
            self.pm.enable_tracing()

    _default: "Registry | None" = None

    @classmethod
    def default(cls) -> "Registry":
        """The process-wide registry; honours ONECOMP_LOAD_PLUGINS and ONECOMP_DISABLE_PLUGINS."""
        if cls._default is None:
            cls._default = cls(only=_split_env(os.environ.get("ONECOMP_LOAD_PLUGINS")),
                               blocked=_split_env(os.environ.get("ONECOMP_DISABLE_PLUGINS")) or ())
        return cls._default

    # ------------------------------------------------------------ loading

    def _ensure_loaded(self) -> None:
        if self._entries is not None:
            return
        with self._lock:
            if self._entries is not None:
                return
            self._entries = {}
            try:
                if self._builtins:
                    for modname in BUILTINS:
                        self._add_plugin(importlib.import_module(modname), modname, "onecomp",
                                         _dist_version("onecomp"))
                if self._use_entry_points:
                    self._load_entry_points()
                self.pm.check_pending()
            except BaseException:  # e.g. DuplicateComponent: fail on every lookup, never half-loaded
                for name, _ in self.pm.list_name_plugin():
                    self.pm.unregister(name=name)
                self._entries, self._errors = None, []
                raise

    def _load_entry_points(self) -> None:
        eps = sorted(entry_points(group=GROUP), key=lambda ep: ((ep.dist.name if ep.dist else ""), ep.name))
        seen: dict[str, str] = {}
        for ep in eps:
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            if self._only is not None and ep.name not in self._only:
                continue
            if ep.name in self._blocked:
                continue
            if ep.name in seen:
                if seen[ep.name] == dist:
                    continue  # the same distribution seen twice (e.g. an editable install on the path)
                self._errors.append(PluginLoadError(ep.name, dist, f"entry point name {ep.name!r} is also used by {seen[ep.name]}"))
                continue
            seen[ep.name] = dist
            try:
                module = ep.load()
                self._add_plugin(module, ep.name, dist, version)
            except DuplicateComponent:
                raise
            except Exception as exc:  # error boundary: one broken plugin must not brick the tool
                self._errors.append(PluginLoadError(ep.name, dist, f"{type(exc).__name__}: {exc}"))

    def _add_plugin(self, module, plugin_name: str, dist: str, version: str) -> None:
        """Register ``module`` with pluggy and collect its components, one plugin at a time."""
        if self.pm.get_plugin(plugin_name) is not None:
            return
        unknown = [n for n in dir(module) if not hasattr(hookspecs, n)
                   and not (self.pm.parse_hookimpl_opts(module, n) or {"optionalhook": True}).get("optionalhook")]
        if unknown:  # refused here, inside the plugin's error boundary, not by check_pending() for all
            raise TypeError(f"plugin {plugin_name} from {dist}: unknown hook(s) {', '.join(unknown)}")
        found: list[Entry] = []
        for kind in KINDS:
            hook = f"register_{kind}s"
            impl = getattr(module, hook, None)
            if impl is None:
                continue

            def register(cls, _kind=kind):
                found.append(self._validate(_kind, cls, plugin_name, dist, version))

            impl(register=register)
        for e in found:  # check before mutating so a clash leaves the registry unchanged
            other = self._entries.get((e.kind, e.name))
            if other is not None:
                raise DuplicateComponent(
                    f"{e.kind} {e.name!r} is provided by {other.dist} {other.version} ({other.plugin}) "
                    f"and {e.dist} {e.version} ({e.plugin}); uninstall one or set "
                    f"ONECOMP_DISABLE_PLUGINS={e.plugin}")
        names = [(e.kind, e.name) for e in found]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise DuplicateComponent(f"{dup[0]} {dup[1]!r} is registered twice by {dist} ({plugin_name})")
        self.pm.register(module, name=plugin_name)  # first: a bad hook signature leaves no entries behind
        for e in found:
            self._entries[(e.kind, e.name)] = e

    @staticmethod
    def _validate(kind: str, cls, plugin: str, dist: str, version: str) -> Entry:
        where = f"{kind} from {dist} ({plugin})"
        if not isinstance(cls, type):
            raise TypeError(f"{where}: register() takes a class, got {cls!r}")
        from . import components

        base = {"quantizer": components.Quantizer, "format": components.Format,
                "planner": components.Planner}.get(kind)
        # an attribute left as the base class's NotImplementedError stub counts as missing
        missing = [a for a in REQUIRED[kind] if not hasattr(cls, a) or
                   (base is not None and isinstance(base.__dict__.get(a), FunctionType) and getattr(cls, a) is getattr(base, a))]
        if missing:
            raise TypeError(f"{where}: {cls.__name__} lacks {', '.join(missing)}")
        name = cls.name
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise TypeError(f"{where}: {cls.__name__}.name {name!r} must match {NAME_RE.pattern}")
        if not attrs.has(cls.Config):
            raise TypeError(f"{where}: {cls.__name__}.Config must be an attrs class")
        needs = getattr(cls, "needs", frozenset())
        allowed = PLANNER_NEEDS if kind == "planner" else STATISTICS
        if not set(needs) <= allowed:
            raise TypeError(f"{where}: {cls.__name__}.needs has {sorted(set(needs) - allowed)}; "
                            f"allowed: {sorted(allowed)}")
        if kind == "refiner":
            if cls.scope not in SCOPES:
                raise TypeError(f"{where}: {cls.__name__}.scope {cls.scope!r} must be one of {SCOPES}")
            method = {"layer": "adjust", "block": "refine_block", "model": "refine_model"}[cls.scope]
            if not callable(getattr(cls, method, None)):
                raise TypeError(f"{where}: {cls.__name__} has scope {cls.scope!r} but no {method}() method")
        if kind == "format" and not isinstance(cls.version, int):
            raise TypeError(f"{where}: {cls.__name__}.version must be an int")
        return Entry(kind, name, cls, plugin, dist, version)

    # ------------------------------------------------------------ lookup

    def get(self, kind: str, name: str) -> type:
        """The component class of ``kind`` registered as ``name``; UnknownComponent if none."""
        return self.entry(kind, name).cls

    def entry(self, kind: str, name: str) -> Entry:
        if kind not in KINDS:
            raise ValueError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")
        self._ensure_loaded()
        try:
            return self._entries[(kind, name)]
        except KeyError:
            raise UnknownComponent(self._unknown_message(kind, name)) from None

    def _unknown_message(self, kind: str, name: str) -> str:
        have = self.names(kind)
        msg = f"no {kind} named {name!r}; installed: {', '.join(have) if have else 'none'}"
        close = difflib.get_close_matches(name, have, n=1)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
        provider = KNOWN_PROVIDERS.get((kind, name))
        if provider:
            msg += f"; it is provided by {provider}: pip install {provider}"
        for err in self._errors:
            msg += f"\n  plugin {err.plugin} from {err.dist} failed to load: {err.error}"
        return msg

    def names(self, kind: str) -> list[str]:
        self._ensure_loaded()
        return sorted(n for (k, n) in self._entries if k == kind)

    def entries(self, kind: str | None = None) -> list[Entry]:
        self._ensure_loaded()
        return sorted((e for e in self._entries.values() if kind in (None, e.kind)), key=lambda e: (e.kind, e.name))

    def load_errors(self) -> list[PluginLoadError]:
        self._ensure_loaded()
        return list(self._errors)

    def resolve(self, kind: str, table: Mapping | str, path: str = "") -> ComponentSpec:
        """A ComponentSpec from ``{"name": ..., **params}`` (or a bare name), validated by its Config."""
        from .validation import build_config

        if isinstance(table, str):
            table = {"name": table}
        if not isinstance(table, Mapping) or "name" not in table:
            raise ConfigError(path, f"must be a table with a 'name' key naming a {kind}; "
                                    f"installed: {', '.join(self.names(kind))}")
        params = dict(table)
        name = params.pop("name")
        try:
            cls = self.get(kind, name)
        except UnknownComponent as exc:
            raise ConfigError(f"{path}.name" if path else "name", str(exc)) from None
        return ComponentSpec(kind, name, build_config(cls.Config, params, path))

    def create(self, spec: ComponentSpec):
        """An instance of the component a spec names."""
        return self.get(spec.kind, spec.name)(spec.config)

    # ------------------------------------------------------------ hooks and tests

    @property
    def hook(self):
        self._ensure_loaded()
        return self.pm.hook

    @contextmanager
    def temporarily(self, plugin, name: str | None = None, dist: str = "test"):
        """Register ``plugin`` (a module or object with hook functions) for the duration of a block."""
        self._ensure_loaded()
        name = name or f"temporary-{id(plugin)}"
        before = dict(self._entries)
        self._add_plugin(plugin, name, dist, "0")
        try:
            yield self
        finally:
            self.pm.unregister(name=name)
            self._entries = before


def _dist_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "0+unknown"
