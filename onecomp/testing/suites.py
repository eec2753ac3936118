"""Conformance suites: base classes a plugin's tests subclass as ``Test*``.

The classes here are not named ``Test*``, so pytest collects their tests only
through a subclass in the plugin's own test module::

    from hypothesis import strategies as st
    from onecomp.testing import FormatSuite, QuantizerSuite, PluginSuite

    class TestGPTQFormat(FormatSuite):
        component = "gptq"                       # resolved through the registry
        invalid_params = [{"bits": 0}, {"group_size": 0}]

        @classmethod
        def params(cls):
            return st.fixed_dictionaries({"bits": st.integers(2, 8)})

    class TestGPTQQuantizer(QuantizerSuite):
        component = "gptq"
        configs = [{"bits": 4, "group_size": 128}, {"bits": 3, "group_size": -1}]
        min_sqnr_db = {4: 18.0, 3: 12.0}

    class TestPlugin(PluginSuite):
        distribution = "onecomp-gptq"
        names = {"quantizer": ["gptq"], "format": ["gptq"]}

Components are looked up in ``Registry.default()`` unless the subclass sets
``registry`` (a Registry, or a callable returning one). Property tests run with
``derandomize=True`` and ``deadline=None`` (set ``ONECOMP_HYPOTHESIS_EXAMPLES`` to
change the number of examples, 25 by default).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import attrs
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from ..components import STATISTICS, Compressed, Format, stored_bits
from ..errors import ConfigError, FormatError, UnknownComponent
from ..registry import GROUP, Registry
from . import strategies as ost

__all__ = ["FormatSuite", "QuantizerSuite", "PluginSuite", "assert_tensors_equal", "bits_equal", "sqnr_db"]

EXAMPLES = int(os.environ.get("ONECOMP_HYPOTHESIS_EXAMPLES", "25"))


def _settings(max_examples: int = EXAMPLES):
    return settings(derandomize=True, max_examples=max_examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors,
                                           HealthCheck.data_too_large])


# ------------------------------------------------------------------ helpers


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, same shape and the very same bytes (so ``-0.0 != 0.0`` and NaN payloads count)."""
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and torch.equal(_raw(a), _raw(b))


def assert_tensors_equal(got, want, what: str = "tensors") -> None:
    """Two dicts of tensors hold the same names, dtypes, shapes and bytes."""
    assert set(got) == set(want), f"{what}: names {sorted(got)} differ from {sorted(want)}"
    for k in want:
        g, w = got[k], want[k]
        assert isinstance(g, torch.Tensor), f"{what}: {k!r} is a {type(g).__name__}, not a tensor"
        assert g.dtype == w.dtype, f"{what}: {k!r} has dtype {g.dtype}, expected {w.dtype}"
        assert tuple(g.shape) == tuple(w.shape), f"{what}: {k!r} has shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        assert bits_equal(g, w), f"{what}: {k!r} differs in its bytes"


def sqnr_db(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(‖W‖² / ‖W − Ŵ‖²)`` in dB (inf if exact)."""
    W, W_hat = W.double(), W_hat.double()
    noise = (W - W_hat).square().sum().item()
    signal = W.square().sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def _registry_of(suite) -> Registry:
    reg = getattr(type(suite), "registry", None)  # via the class: a plain function stays unbound
    if reg is None:
        return Registry.default()
    if not isinstance(reg, Registry) and callable(reg):
        reg = reg()
    return reg


def _clone(tensors):
    return {k: v.detach().clone() for k, v in tensors.items()}


# ------------------------------------------------------------------ formats


class FormatSuite:
    """Conformance tests for a storage Format.

    Set ``component`` (a registered format name, or the Format class itself) and
    override ``params()`` (a strategy of valid params dicts; ``params_for(shape)``
    when they depend on the shape) and ``invalid_params`` (dicts ``from_dict``
    must refuse with ConfigError). ``reference_dequantize`` may return an
    independent fp32 reconstruction from the logical fields to compare against.
    """

    component: str | type | None = None
    registry = None
    invalid_params: list = []
    max_out: int = 64
    max_in: int = 300
    rtol: float = 1e-5
    atol: float = 1e-6

    @classmethod
    def params(cls) -> st.SearchStrategy[dict]:
        return st.just({})

    @classmethod
    def params_for(cls, shape: tuple[int, int]) -> st.SearchStrategy[dict]:
        return cls.params()

    def reference_dequantize(self, fmt, fields, shape) -> torch.Tensor | None:
        return None

    # -- helpers
    def format_class(self) -> type:
        if isinstance(self.component, type):
            return self.component
        if not self.component:
            pytest.fail(f"{type(self).__name__}.component must name a registered format")
        return _registry_of(self).get("format", self.component)

    def make_format(self, params: dict):
        return self.format_class().from_dict(params)

    def draw_case(self, data):
        """(format, shape, fields, seed) for one example."""
        shape = data.draw(ost.shapes(self.max_out, self.max_in), label="shape")
        params = data.draw(self.params_for(shape), label="params")
        fmt = self.make_format(params)
        seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
        fields = fmt.example(shape, torch.Generator().manual_seed(seed))
        return fmt, shape, fields, seed

    # -- tests
    def test_registered(self):
        cls = self.format_class()
        assert isinstance(cls.version, int) and cls.version >= 1, f"{cls.__name__}.version must be an int >= 1"
        assert isinstance(cls.trainable, tuple) and all(isinstance(n, str) for n in cls.trainable), \
            f"{cls.__name__}.trainable must be a tuple of field names"
        assert isinstance(cls.discrete, dict) and all(isinstance(n, str) for n in cls.discrete), \
            f"{cls.__name__}.discrete must map field names to 'sign' or 'integer'"
        if isinstance(self.component, str):
            assert _registry_of(self).entry("format", self.component).cls is cls
            assert cls.name == self.component

    def test_invalid_params_refused(self):
        cls = self.format_class()
        for params in [{"no_such_param_for_the_kit": 1}, *self.invalid_params]:
            try:
                cls.from_dict(params)
            except ConfigError:
                continue
            except Exception as exc:  # pragma: no cover - a failure path
                pytest.fail(f"{cls.__name__}.from_dict({params!r}) raised {type(exc).__name__}: {exc}; "
                            "expected onecomp.ConfigError")
            pytest.fail(f"{cls.__name__}.from_dict({params!r}) was accepted; expected onecomp.ConfigError")

    @_settings()
    @given(data=st.data())
    def test_params_round_trip(self, data):
        fmt, shape, fields, seed = self.draw_case(data)
        d = fmt.to_dict()
        again = json.loads(json.dumps(d))
        assert again == d, "format params must be JSON-able"
        assert self.format_class().from_dict(again).to_dict() == d

    @_settings()
    @given(data=st.data())
    def test_pack_unpack_round_trip(self, data):
        fmt, shape, fields, seed = self.draw_case(data)
        before = _clone(fields)
        stored = fmt.pack(fields, shape)
        assert_tensors_equal(fields, before, "pack() modified its input fields")
        assert stored and all(isinstance(t, torch.Tensor) for t in stored.values())
        assert_tensors_equal(fmt.unpack(stored, shape), fields, "unpack(pack(fields))")

    @_settings()
    @given(data=st.data())
    def test_safetensors_round_trip(self, data):
        fmt, shape, fields, seed = self.draw_case(data)
        stored = fmt.pack(fields, shape)
        loaded = safetensors_load(safetensors_save(stored))
        assert_tensors_equal(loaded, stored, "safetensors round trip")
        fmt.check(loaded, shape)
        assert bits_equal(fmt.dequantize(loaded, shape), fmt.dequantize(stored, shape))

    @_settings()
    @given(data=st.data())
    def test_dequantize_matches_reference(self, data):
        fmt, shape, fields, seed = self.draw_case(data)
        stored = fmt.pack(fields, shape)
        repacked = fmt.pack(fmt.unpack(stored, shape), shape)
        assert_tensors_equal(repacked, stored, "pack(unpack(stored))")
        W = fmt.dequantize(stored, shape)
        assert isinstance(W, torch.Tensor) and W.dtype == torch.float32, "dequantize must return fp32"
        assert tuple(W.shape) == tuple(shape), f"dequantize gave {tuple(W.shape)}, expected {shape}"
        assert torch.isfinite(W).all(), "dequantize of a valid example is not finite"
        assert bits_equal(fmt.dequantize(repacked, shape), W), "dequantize is not deterministic"
        assert bits_equal(fmt.dequantize(stored, shape), W), "dequantize is not deterministic"
        ref = self.reference_dequantize(fmt, fields, shape)
        if ref is not None:
            torch.testing.assert_close(W, ref.float(), rtol=self.rtol, atol=self.atol)

    @_settings()
    @given(data=st.data())
    def test_linear_matches_dequantize(self, data):
        fmt, shape, fields, seed = self.draw_case(data)
        stored = fmt.pack(fields, shape)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(3, shape[1], generator=g)
        bias = torch.randn(shape[0], generator=g)
        ref = torch.nn.functional.linear(x, fmt.dequantize(stored, shape), bias)
        y = fmt.linear(x, stored, shape, bias)
        assert y.shape == ref.shape
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * scale)

    @_settings()
    @given(data=st.data())
    def test_bits_per_weight_is_exact(self, data):
        fmt, shape, fields, seed = self.draw_case(data)
        stored = fmt.pack(fields, shape)
        bits = stored_bits(stored)
        assert fmt.expected_bits(shape) == bits, \
            f"expected_bits{shape} = {fmt.expected_bits(shape)} but the stored tensors hold {bits} bits"
        assert fmt.bits_per_weight(stored, shape) == pytest.approx(bits / (shape[0] * shape[1]), rel=1e-12)

    @_settings()
    @given(data=st.data())
    def test_check_accepts_valid_and_refuses_bad_tensors(self, data):
        fmt, shape, fields, seed = self.draw_case(data)
        stored = fmt.pack(fields, shape)
        fmt.check(stored, shape)
        want = {k: (tuple(v.shape), v.dtype) for k, v in stored.items()}
        assert fmt.stored_shapes(shape) == want, "stored tensor shapes/dtypes must depend on the shape only"
        bad_cases = {}
        for k, t in stored.items():
            other = torch.float64 if t.dtype != torch.float64 else torch.float32
            grown = torch.zeros((t.shape[0] + 1, *t.shape[1:]) if t.dim() else (1,), dtype=t.dtype)
            bad_cases[f"{k} with wrong dtype"] = {**stored, k: t.to(other)}
            bad_cases[f"{k} with wrong shape"] = {**stored, k: grown}
            bad_cases[f"missing {k}"] = {n: v for n, v in stored.items() if n != k}
        bad_cases["an extra tensor"] = {**stored, "unexpected_extra_tensor": torch.zeros(1)}
        for what, bad in bad_cases.items():
            with pytest.raises(FormatError):
                fmt.check(bad, shape)
                pytest.fail(f"check() accepted stored tensors with {what}")

    @_settings()
    @given(data=st.data())
    def test_trainable_fields_take_gradients(self, data):
        """What training refiners rely on: float fields get gradients through ``dequantize_fields``."""
        fmt, shape, fields, seed = self.draw_case(data)
        logical = fmt.unpack(fmt.pack(fields, shape), shape)
        R = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))
        for name in type(fmt).trainable:
            assert name in logical, f"trainable field {name!r} is not among unpack()'s fields {sorted(logical)}"
            assert logical[name].is_floating_point(), f"trainable field {name!r} is {logical[name].dtype}"
            leaf = logical[name].detach().float().clone().requires_grad_(True)
            W = fmt.dequantize_fields({**logical, name: leaf}, shape)
            assert W.requires_grad, f"dequantize_fields() cut the graph: no gradient can reach {name!r}"
            (W * R).sum().backward()
            assert leaf.grad is not None, f"no gradient reaches {name!r}"
            assert leaf.grad.shape == leaf.shape and torch.isfinite(leaf.grad).all()
            if W.detach().abs().sum() > 0:  # Ŵ = 0 (e.g. every code at its zero point) may have no gradient
                assert leaf.grad.abs().sum() > 0, f"the gradient of {name!r} is identically zero"

    @_settings()
    @given(data=st.data())
    def test_discrete_fields_train_through_latents(self, data):
        """``snap(latent_init)`` gives back the stored values, snapping is idempotent, the float
        latent dequantizes like the stored codes, and a straight-through gradient reaches it."""
        fmt, shape, fields, seed = self.draw_case(data)
        stored = fmt.pack(fields, shape)
        logical = fmt.unpack(stored, shape)
        W0 = fmt.dequantize(stored, shape)
        R = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))
        for name, kind in type(fmt).discrete.items():
            assert kind in ("sign", "integer"), f"discrete field {name!r} has kind {kind!r}; use 'sign' or 'integer'"
            assert name in logical, f"discrete field {name!r} is not among unpack()'s fields {sorted(logical)}"
            latent = fmt.latent_init(name, logical)
            assert latent.is_floating_point() and latent.shape == logical[name].shape
            snapped = fmt.snap(name, latent)
            assert torch.equal(snapped, logical[name].to(snapped.dtype)), f"snap(latent_init({name!r})) != stored"
            assert torch.equal(fmt.snap(name, snapped), snapped), f"snap is not idempotent on {name!r}"
            if kind == "sign":
                assert set(snapped.unique().tolist()) <= {-1.0, 1.0}, f"sign field {name!r} snaps outside ±1"
            noisy = latent + 0.3 * torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
            assert torch.equal(fmt.snap(name, fmt.snap(name, noisy)), fmt.snap(name, noisy))
            torch.testing.assert_close(fmt.dequantize_fields({**logical, name: snapped}, shape), W0)
            leaf = latent.clone().requires_grad_(True)
            W = fmt.dequantize_fields({**logical, name: leaf + (fmt.snap(name, leaf) - leaf).detach()}, shape)
            (W * R).sum().backward()
            assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), f"no STE gradient reaches {name!r}"

    @_settings()
    @given(data=st.data())
    def test_identical_bytes_for_identical_inputs(self, data):
        fmt, shape, fields, seed = self.draw_case(data)
        again = self.make_format(fmt.to_dict())
        fields2 = again.example(shape, torch.Generator().manual_seed(seed))
        assert_tensors_equal(fields2, fields, "example() with the same seed")
        assert safetensors_save(fmt.pack(fields, shape)) == safetensors_save(again.pack(fields2, shape))


# ------------------------------------------------------------------ quantizers


class QuantizerSuite:
    """Conformance tests for a Quantizer.

    Set ``component`` (a registered quantizer name), ``configs`` (config dicts to
    try, without ``name``) and ``min_sqnr_db`` (``bits → floor`` in dB on a seeded
    random layer; a ``None`` key is the floor for configs without ``bits``). SQNR is
    measured on the weight, or on the layer's outputs with ``sqnr_space = "output"``.
    Statistics are built from seeded activations with ``H = 2/N XᵀX`` and only
    those in the quantizer's ``needs`` are supplied.
    """

    component: str | None = None
    registry = None
    configs: list = [{}]
    min_sqnr_db: dict = {}
    default_min_sqnr_db: float = 0.0
    shape: tuple[int, int] = (48, 160)
    sqnr_space: str = "weight"  # or "output": SQNR of X Wᵀ, what Hessian-based quantizers minimise
    seed: int = 0
    edge_max_out: int = 24
    edge_max_in: int = 160
    edge_examples: int = 10

    # -- helpers
    def quantizer_class(self) -> type:
        if not self.component:
            pytest.fail(f"{type(self).__name__}.component must name a registered quantizer")
        return _registry_of(self).get("quantizer", self.component)

    def spec(self, cfg: dict):
        return _registry_of(self).resolve("quantizer", {"name": self.component, **cfg}, "quantizer")

    def make_quantizer(self, cfg: dict):
        return _registry_of(self).create(self.spec(cfg))

    def make_task(self, W=None, seed: int | None = None):
        return ost.make_task(self.shape if W is None else W, self.quantizer_class().needs,
                             seed=self.seed if seed is None else seed)

    def sqnr_floor(self, cfg: dict) -> float:
        bits = cfg.get("bits", getattr(self.spec(cfg).config, "bits", None))
        return self.min_sqnr_db.get(bits, self.min_sqnr_db.get(None, self.default_min_sqnr_db))

    def quantize(self, cfg: dict, task):
        """Quantize ``task`` and check the result is a valid Compressed; returns (compressed, format)."""
        c = self.make_quantizer(cfg).quantize(task)
        assert isinstance(c, Compressed), f"quantize() returned {type(c).__name__}, expected onecomp.Compressed"
        assert tuple(c.shape) == tuple(task.shape), f"Compressed.shape {c.shape} != task shape {task.shape}"
        assert isinstance(c.format, Format), f"Compressed.format must be a Format instance, got {c.format!r}"
        try:
            fmt_cls = _registry_of(self).get("format", c.format.name)
        except UnknownComponent as exc:
            pytest.fail(f"quantize() output names format {c.format.name!r}, which is not registered: {exc}")
        assert json.loads(json.dumps(c.params)) == c.params, "Compressed.params must be JSON-able"
        fmt = fmt_cls.from_dict(c.params)  # the manifest's params rebuild the same format
        fmt.check(c.tensors, tuple(task.shape))
        return c, fmt

    # -- tests
    def test_registered(self):
        cls = self.quantizer_class()
        assert cls.name == self.component
        assert set(cls.needs) <= STATISTICS
        self.spec({})  # the default Config is constructible

    def test_config_round_trip(self):
        for cfg in self.configs:
            spec = self.spec(cfg)
            d = attrs.asdict(spec.config)
            again = _registry_of(self).resolve("quantizer", {"name": self.component, **json.loads(json.dumps(d))})
            assert again.config == spec.config, f"{cfg!r}: Config -> dict -> Config changed it"
            assert spec.to_dict() == {"name": self.component, **d}

    def test_unknown_key_refused(self):
        with pytest.raises(ConfigError) as info:
            self.spec({**self.configs[0], "no_such_option_for_the_kit": 1})
        assert info.value.path.endswith("no_such_option_for_the_kit")

    def test_output_is_a_valid_registered_format(self):
        for cfg in self.configs:
            task = self.make_task()
            c, fmt = self.quantize(cfg, task)
            W_hat = fmt.dequantize(c.tensors, task.shape)
            assert tuple(W_hat.shape) == task.shape and torch.isfinite(W_hat).all()
            assert_tensors_equal(safetensors_load(safetensors_save(c.tensors)), c.tensors, "safetensors round trip")

    def test_sqnr_above_floor(self):
        for cfg in self.configs:
            task = self.make_task()
            W = task.W.clone()
            c, fmt = self.quantize(cfg, task)
            W_hat = fmt.dequantize(c.tensors, task.shape)
            if self.sqnr_space == "output":  # on the layer's outputs X Wᵀ, for the task's own activations
                X = ost.activations(task.stats.n_tokens or max(256, 2 * W.shape[1]), W.shape[1], self.seed)
                W, W_hat = X @ W.T, X @ W_hat.T
            got = sqnr_db(W, W_hat)
            floor = self.sqnr_floor(cfg)
            assert got >= floor, f"{cfg!r}: SQNR {got:.2f} dB is below the floor {floor} dB"

    def test_deterministic_with_a_seed(self):
        for cfg in self.configs:
            c1, _ = self.quantize(cfg, self.make_task())
            c2, _ = self.quantize(cfg, self.make_task())
            assert (c1.format.name, c1.params) == (c2.format.name, c2.params)
            assert_tensors_equal(c2.tensors, c1.tensors, f"{cfg!r}: two runs with one seed")

    def test_inputs_not_modified(self):
        for cfg in self.configs:
            task = self.make_task()
            W = task.W.clone()
            stats = {k: v.clone() for k, v in attrs.asdict(task.stats, recurse=False).items()
                     if isinstance(v, torch.Tensor)}
            self.quantize(cfg, task)
            assert bits_equal(task.W, W), f"{cfg!r}: quantize() modified task.W in place"
            for k, v in stats.items():
                # q/k/v share one LayerStats: an in-place change would corrupt the next layer
                assert bits_equal(getattr(task.stats, k), v), f"{cfg!r}: quantize() modified task.stats.{k} in place"

    def test_non_finite_weights_refused(self):
        for bad in (math.nan, math.inf, -math.inf):
            task = self.make_task()
            task.W[task.shape[0] // 2, task.shape[1] // 3] = bad
            with pytest.raises((ValueError, FormatError)):
                self.make_quantizer(self.configs[0]).quantize(task)
                pytest.fail(f"quantize() accepted a weight containing {bad}")

    @_settings(max_examples=min(EXAMPLES, 10))
    @given(data=st.data())
    def test_edge_case_weights(self, data):
        cfg = data.draw(st.sampled_from(self.configs), label="config")
        shape = data.draw(ost.shapes(self.edge_max_out, self.edge_max_in), label="shape")
        W = data.draw(ost.weights(shape), label="W")
        task = self.make_task(W, seed=data.draw(st.integers(0, 2**16), label="seed"))
        c, fmt = self.quantize(cfg, task)
        assert torch.isfinite(fmt.dequantize(c.tensors, task.shape)).all(), "non-finite reconstruction"


# ------------------------------------------------------------------ plugin distributions


def _normalize(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


class PluginSuite:
    """Checks a plugin distribution: its ``onecomp`` entry points load, register the
    declared ``names`` (``{kind: [name, ...]}``), and importing them stays light."""

    distribution: str | None = None
    names: dict = {}
    forbidden_modules: tuple = ("triton", "datasets", "ortools")

    def entry_points(self) -> list:
        if not self.distribution:
            pytest.fail(f"{type(self).__name__}.distribution must name the plugin's distribution")
        want = _normalize(self.distribution)
        eps = [ep for ep in entry_points(group=GROUP) if ep.dist is not None and _normalize(ep.dist.name) == want]
        if not eps:
            pytest.fail(f"distribution {self.distribution!r} has no entry point in group {GROUP!r}: declare "
                        f"[project.entry-points.{GROUP}] in its pyproject.toml and `pip install -e` it")
        return eps

    def test_entry_points_load(self):
        for ep in self.entry_points():
            module = ep.load()
            hooks = [h for h in dir(module) if h.startswith("register_")]
            assert hooks, f"entry point {ep.name} ({ep.value}) defines no register_* hook"

    def test_names_register(self):
        eps = self.entry_points()
        reg = Registry(only={ep.name for ep in eps})
        mine = [e for e in reg.load_errors() if _normalize(e.dist) == _normalize(self.distribution)]
        assert not mine, f"plugin failed to load: {mine}"
        provided = {(e.kind, e.name) for e in reg.entries() if _normalize(e.dist) == _normalize(self.distribution)}
        assert provided, f"{self.distribution} registers no component"
        if self.names:
            declared = {(kind, n) for kind, names in self.names.items() for n in names}
            assert provided == declared, f"{self.distribution} registers {sorted(provided)}, " \
                                         f"the suite declares {sorted(declared)}"

    def test_import_is_light(self):
        eps = self.entry_points()
        modules = sorted({ep.value.split(":")[0] for ep in eps})
        own = {m.split(".")[0] for m in modules}
        code = textwrap.dedent(f"""
            import importlib, json, sys
            import onecomp
            for m in {modules!r}:
                importlib.import_module(m)
            onecomp.Registry(only={sorted(ep.name for ep in eps)!r}).names("format")
            print(json.dumps(sorted(sys.modules)))
        """)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        loaded = json.loads(proc.stdout.strip().splitlines()[-1])
        tops = {m.split(".")[0] for m in loaded}
        problems = []
        heavy = sorted(tops & set(self.forbidden_modules))
        if heavy:
            problems.append(f"importing {modules} loads {heavy}; import them lazily where used")
        siblings = sorted(t for t in tops if t.startswith("onecomp_") and t not in own)
        if siblings:
            problems.append(f"importing {modules} loads other plugins {siblings}; plugins meet through the registry")
        assert not problems, "\n".join(problems)

