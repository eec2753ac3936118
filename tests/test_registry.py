"""The registry: built-ins, lookup errors, duplicates, broken plugins, allow/block lists, validation."""

import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import attrs
import pluggy
import pytest

import onecomp
import onecomp.registry as registry_mod
from onecomp import (ComponentSpec, DuplicateComponent, NoConfig, Quantizer, Refiner, Registry,
                     UnknownComponent, hookimpl)
from onecomp.builtin.dense import Dense, DenseParams
from onecomp.errors import ConfigError


def quantizer(name, needs=()):
    """A minimal Quantizer class called ``name``."""
    return type(f"Q_{name.replace('-', '_')}", (Quantizer,),
                {"name": name, "needs": frozenset(needs), "quantize": lambda self, task: None})


def plugin(**hooks):
    """A plugin object whose register_<kind>s hooks register the given classes."""
    ns = SimpleNamespace()
    for hook, classes in hooks.items():
        def impl(register, _classes=classes):
            for cls in _classes:
                register(cls)
        setattr(ns, hook, hookimpl(impl))
    return ns


class FakeEntryPoint:
    """Stands in for importlib.metadata.EntryPoint: a name, a distribution, and load()."""

    def __init__(self, name, dist, target, version="1.0"):
        self.name = name
        self.value = f"{dist.replace('-', '_')}.plugin"
        self.dist = SimpleNamespace(name=dist, version=version)
        self._target = target

    def load(self):
        if isinstance(self._target, BaseException):
            raise self._target
        return self._target


@pytest.fixture
def fake_entry_points(monkeypatch):
    """Replace the installed entry points of group ``onecomp`` with the given fakes."""

    def install(*eps):
        def entry_points(group):
            assert group == "onecomp"
            return list(eps)

        monkeypatch.setattr(registry_mod, "entry_points", entry_points)

    return install


# ------------------------------------------------------------------ built-ins and lookup


def test_builtins_are_registered_by_the_core_distribution():
    reg = Registry(entry_points=False)
    assert "dense" in reg.names("format")
    assert "uniform" in reg.names("planner")
    assert "torch" in reg.names("backend")
    assert reg.get("format", "dense") is Dense
    for kind, name in [("format", "dense"), ("planner", "uniform"), ("backend", "torch")]:
        assert reg.entry(kind, name).dist == "onecomp"
    assert reg.load_errors() == []


def test_no_builtins_when_asked():
    reg = Registry(entry_points=False, builtins=False)
    assert reg.names("format") == []


def test_unknown_name_lists_installed_a_close_match_and_the_distribution():
    reg = Registry(entry_points=False)
    with pytest.raises(UnknownComponent) as info:
        reg.get("format", "dens")
    msg = str(info.value)
    assert "no format named 'dens'" in msg and "installed: dense" in msg and "did you mean 'dense'" in msg

    with reg.temporarily(plugin(register_quantizers=[quantizer("gptqx")]), name="x"):
        with pytest.raises(UnknownComponent) as info:
            reg.get("quantizer", "gptq")
    msg = str(info.value)
    assert "installed: gptqx" in msg
    assert "did you mean 'gptqx'" in msg
    assert "pip install onecomp-gptq" in msg


def test_unknown_name_with_nothing_installed():
    reg = Registry(entry_points=False)
    with pytest.raises(UnknownComponent, match="installed: none"):
        reg.get("regularizer", "signlock")
    assert isinstance(UnknownComponent("x"), LookupError)


def test_unknown_kind_is_a_value_error():
    with pytest.raises(ValueError, match="kinds are quantizer, format"):
        Registry(entry_points=False).get("quantiser", "gptq")


def test_resolve_and_create():
    reg = Registry(entry_points=False)
    spec = reg.resolve("format", {"name": "dense", "dtype": "float32"}, "fmt")
    assert spec == ComponentSpec("format", "dense", DenseParams("float32"))
    assert spec.to_dict() == {"name": "dense", "dtype": "float32"}
    assert reg.resolve("format", "dense").config == DenseParams()
    fmt = reg.create(spec)
    assert isinstance(fmt, Dense) and fmt.params.dtype == "float32"
    with pytest.raises(ConfigError) as info:
        reg.resolve("format", {"name": "nope"}, "fmt")
    assert info.value.path == "fmt.name" and "installed: dense" in str(info.value)
    with pytest.raises(ConfigError) as info:
        reg.resolve("format", {"name": "dense", "dtype": "int3"}, "fmt")
    assert info.value.path == "fmt.dtype"
    with pytest.raises(ConfigError, match="with a 'name' key"):
        reg.resolve("format", {"dtype": "float32"}, "fmt")


# ------------------------------------------------------------------ duplicates


def test_duplicate_name_from_two_plugins_names_both_distributions():
    reg = Registry(entry_points=False)
    first = plugin(register_quantizers=[quantizer("dup")])
    second = plugin(register_quantizers=[quantizer("dup"), quantizer("other")])
    with reg.temporarily(first, name="alpha", dist="onecomp-alpha"):
        with pytest.raises(DuplicateComponent) as info:
            with reg.temporarily(second, name="beta", dist="onecomp-beta"):
                pass  # pragma: no cover
        msg = str(info.value)
        assert "quantizer 'dup'" in msg and "onecomp-alpha" in msg and "onecomp-beta" in msg
        assert "ONECOMP_DISABLE_PLUGINS=beta" in msg
        # the clash left the registry as it was
        assert reg.names("quantizer") == ["dup"]
        assert reg.entry("quantizer", "dup").dist == "onecomp-alpha"
        assert reg.pm.get_plugin("beta") is None
    assert reg.names("quantizer") == []


def test_duplicate_of_a_builtin_names_onecomp():
    reg = Registry(entry_points=False)
    clash = type("MyDense", (Dense,), {})
    with pytest.raises(DuplicateComponent, match=r"format 'dense' is provided by onecomp .* and onecomp-mine"):
        with reg.temporarily(plugin(register_formats=[clash]), name="mine", dist="onecomp-mine"):
            pass  # pragma: no cover


def test_one_plugin_registering_a_name_twice():
    reg = Registry(entry_points=False)
    with pytest.raises(DuplicateComponent, match="registered twice by onecomp-twice"):
        with reg.temporarily(plugin(register_quantizers=[quantizer("q"), quantizer("q")]), dist="onecomp-twice"):
            pass  # pragma: no cover


def test_same_name_in_different_kinds_is_fine():
    reg = Registry(entry_points=False)
    fmt = type("F", (Dense,), {"name": "same"})
    with reg.temporarily(plugin(register_quantizers=[quantizer("same")], register_formats=[fmt])):
        assert "same" in reg.names("quantizer") and "same" in reg.names("format")


def test_duplicate_across_entry_points(fake_entry_points):
    fake_entry_points(FakeEntryPoint("one", "onecomp-one", plugin(register_quantizers=[quantizer("q")])),
                      FakeEntryPoint("two", "onecomp-two", plugin(register_quantizers=[quantizer("q")])))
    with pytest.raises(DuplicateComponent) as info:
        Registry().names("quantizer")
    assert "onecomp-one" in str(info.value) and "onecomp-two" in str(info.value)


# ------------------------------------------------------------------ entry points


def test_broken_entry_point_is_recorded_and_the_others_load(fake_entry_points):
    bad_class = plugin(register_quantizers=[quantizer("Bad Name")])
    fake_entry_points(
        FakeEntryPoint("broken", "onecomp-broken", ImportError("no module named 'missing_dep'")),
        FakeEntryPoint("badclass", "onecomp-badclass", bad_class),
        FakeEntryPoint("good", "onecomp-good", plugin(register_quantizers=[quantizer("fine")]), version="2.3"),
    )
    reg = Registry()
    assert reg.names("quantizer") == ["fine"]
    entry = reg.entry("quantizer", "fine")
    assert (entry.dist, entry.version, entry.plugin) == ("onecomp-good", "2.3", "good")
    errors = {e.plugin: e for e in reg.load_errors()}
    assert set(errors) == {"broken", "badclass"}
    assert errors["broken"].dist == "onecomp-broken"
    assert errors["broken"].error == "ImportError: no module named 'missing_dep'"
    assert errors["badclass"].error.startswith("TypeError:")
    assert reg.pm.get_plugin("broken") is None and reg.pm.get_plugin("good") is not None
    with pytest.raises(UnknownComponent) as info:
        reg.get("quantizer", "missing")
    assert "plugin broken from onecomp-broken failed to load: ImportError" in str(info.value)


def test_misspelled_or_malformed_hooks_stay_inside_their_plugin(fake_entry_points):
    @hookimpl
    def register_quantizer(register):  # singular: not a hook
        pass  # pragma: no cover

    @hookimpl
    def register_formats(register, extra):  # an argument the hookspec does not have
        register(type("F", (Dense,), {"name": "half-registered"}))

    fake_entry_points(
        FakeEntryPoint("typo", "onecomp-typo", SimpleNamespace(register_quantizer=register_quantizer)),
        FakeEntryPoint("sig", "onecomp-sig", SimpleNamespace(register_formats=register_formats)),
        FakeEntryPoint("good", "onecomp-good", plugin(register_quantizers=[quantizer("fine")])),
    )
    reg = Registry()
    assert reg.names("quantizer") == ["fine"] and reg.names("format") == ["dense"]
    errors = {e.plugin: e.error for e in reg.load_errors()}
    assert set(errors) == {"typo", "sig"}
    assert "unknown hook(s) register_quantizer" in errors["typo"]
    assert "extra" in errors["sig"]
    assert reg.pm.get_plugin("typo") is None and reg.pm.get_plugin("sig") is None


def test_a_failed_load_fails_every_lookup(fake_entry_points):
    fake_entry_points(FakeEntryPoint("one", "onecomp-one", plugin(register_quantizers=[quantizer("q")])),
                      FakeEntryPoint("two", "onecomp-two", plugin(register_quantizers=[quantizer("q")])))
    reg = Registry()
    for _ in range(2):  # not half-loaded after the first failure
        with pytest.raises(DuplicateComponent):
            reg.names("format")


def test_entry_point_name_used_by_two_distributions(fake_entry_points):
    fake_entry_points(FakeEntryPoint("p", "onecomp-a", plugin(register_quantizers=[quantizer("qa")])),
                      FakeEntryPoint("p", "onecomp-b", plugin(register_quantizers=[quantizer("qb")])))
    reg = Registry()
    assert reg.names("quantizer") == ["qa"]
    [err] = reg.load_errors()
    assert err.dist == "onecomp-b" and "also used by onecomp-a" in err.error


def test_nothing_loads_before_the_first_lookup(fake_entry_points):
    calls = []

    class Recording(FakeEntryPoint):
        def load(self):
            calls.append(self.name)
            return super().load()

    fake_entry_points(Recording("a", "onecomp-a", plugin(register_quantizers=[quantizer("qa")])))
    reg = Registry()
    assert calls == []
    reg.names("quantizer")
    reg.names("format")
    assert calls == ["a"]


@pytest.fixture
def two_plugins(fake_entry_points):
    fake_entry_points(FakeEntryPoint("a", "onecomp-a", plugin(register_quantizers=[quantizer("qa")])),
                      FakeEntryPoint("b", "onecomp-b", plugin(register_quantizers=[quantizer("qb")])))


def test_allow_list_and_block_list(two_plugins):
    assert Registry().names("quantizer") == ["qa", "qb"]
    assert Registry(only={"a"}).names("quantizer") == ["qa"]
    assert Registry(blocked={"a"}).names("quantizer") == ["qb"]
    assert Registry(only={"a", "b"}, blocked={"b"}).names("quantizer") == ["qa"]
    none = Registry(only=set())
    assert none.names("quantizer") == [] and none.names("format") == ["dense"]  # built-ins always load
    assert Registry(entry_points=False).names("quantizer") == []


@pytest.mark.parametrize("env, expected", [
    ({"ONECOMP_LOAD_PLUGINS": "a"}, ["qa"]),
    ({"ONECOMP_LOAD_PLUGINS": " b , c "}, ["qb"]),
    ({"ONECOMP_LOAD_PLUGINS": ""}, []),
    ({"ONECOMP_DISABLE_PLUGINS": "a"}, ["qb"]),
    ({"ONECOMP_DISABLE_PLUGINS": "a,b"}, []),
    ({}, ["qa", "qb"]),
])
def test_environment_controls_the_default_registry(two_plugins, monkeypatch, env, expected):
    monkeypatch.delenv("ONECOMP_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("ONECOMP_DISABLE_PLUGINS", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(Registry, "_default", None)
    reg = Registry.default()
    assert Registry.default() is reg
    assert reg.names("quantizer") == expected


# ------------------------------------------------------------------ validation of component classes


class NoConfigAttr:
    name = "noconf"
    needs = frozenset()

    def quantize(self, task):
        pass


@pytest.mark.parametrize("kind, cls, message", [
    ("quantizer", quantizer("Bad Name"), "must match"),
    ("quantizer", quantizer("9lives"), "must match"),
    ("quantizer", type("Q", (Quantizer,), {"name": 3, "quantize": lambda s, t: None}), "must match"),
    ("quantizer", type("Q", (Quantizer,), {"quantize": lambda s, t: None}), "lacks name"),
    ("quantizer", NoConfigAttr, "lacks Config"),
    ("quantizer", type("Q", (Quantizer,), {"name": "q", "Config": dict, "quantize": lambda s, t: None}),
     "Config must be an attrs class"),
    ("quantizer", quantizer("q", needs={"hessian", "gradients"}), "needs has ['gradients']"),
    ("quantizer", quantizer("q")(), "takes a class"),
    ("format", type("F", (), {"name": "f", "version": 1, "Config": NoConfig}), "lacks pack"),
    ("format", type("F", (Dense,), {"name": "f", "version": "1"}), "version must be an int"),
    ("refiner", type("R", (Refiner,), {"name": "r", "scope": "global"}), "scope 'global' must be one of"),
])
def test_invalid_component_classes_are_refused(kind, cls, message):
    reg = Registry(entry_points=False)
    before = reg.entries()
    with pytest.raises(TypeError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        with reg.temporarily(plugin(**{f"register_{kind}s": [cls]}), name="bad", dist="onecomp-bad"):
            pass  # pragma: no cover
    assert "onecomp-bad" in str(info.value)
    assert reg.entries() == before and reg.pm.get_plugin("bad") is None


def test_valid_component_with_no_config():
    reg = Registry(entry_points=False)
    q = quantizer("plain", needs={"hessian", "cross", "diag", "samples"})
    assert q.Config is NoConfig
    with reg.temporarily(plugin(register_quantizers=[q])):
        assert reg.resolve("quantizer", "plain").config == NoConfig()
        with pytest.raises(ConfigError, match="unknown key; allowed: none"):
            reg.resolve("quantizer", {"name": "plain", "bits": 4})


# ------------------------------------------------------------------ hooks


def test_observer_hooks_reach_plugins():
    reg = Registry(entry_points=False)
    seen = []

    class Observer:
        @hookimpl
        def on_stage_end(self, run, stage, report):
            seen.append((run, stage, report))

    with reg.temporarily(Observer(), name="observer"):
        reg.hook.on_stage_end(run="r", stage="s", report="p")
    reg.hook.on_stage_end(run="r2", stage="s2", report="p2")
    assert seen == [("r", "s", "p")]


def test_hookimpl_with_an_unknown_argument_is_refused():
    reg = Registry(entry_points=False)

    class Wrong:
        @hookimpl
        def register_quantizers(self, register, extra):
            pass  # pragma: no cover

    with pytest.raises(pluggy.PluginValidationError):
        reg.pm.register(Wrong(), name="wrong")


# ------------------------------------------------------------------ import cost


def test_import_onecomp_is_lazy():
    code = textwrap.dedent("""
        import importlib.metadata, json, sys
        calls = []
        real = importlib.metadata.entry_points
        def counting(*a, **k):
            calls.append(k.get("group"))
            return real(*a, **k)
        importlib.metadata.entry_points = counting
        import onecomp
        state = {"transformers": "transformers" in sys.modules, "datasets": "datasets" in sys.modules,
                 "default": onecomp.Registry._default is not None, "calls": calls.count("onecomp")}
        onecomp.Registry.default().names("format")
        state["calls_after_lookup"] = calls.count("onecomp")
        print(json.dumps(state))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state == {"transformers": False, "datasets": False, "default": False, "calls": 0,
                     "calls_after_lookup": 1}


def test_public_api_exports():
    for name in onecomp.__all__:
        assert hasattr(onecomp, name), name
    assert attrs.has(DenseParams)


def test_known_providers_are_first_party_distributions():
    """The install hint for a missing component names a distribution that exists under plugins/."""
    from pathlib import Path

    from onecomp.registry import KNOWN_PROVIDERS

    plugins = Path(__file__).resolve().parents[1] / "plugins"
    for (kind, name), dist in KNOWN_PROVIDERS.items():
        assert (plugins / dist / "pyproject.toml").is_file(), f"{kind} {name}: {dist} is not under plugins/"
