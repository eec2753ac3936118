"""The conformance kit itself: strategies generate valid cases, suites pass good components and
catch broken ones, the pytest plugin is cheap and provides its fixtures."""

import contextlib
import json
import subprocess
import sys
import textwrap

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onecomp import Compressed, Quantizer, Registry, hookimpl, in_range
from onecomp.builtin.dense import Dense
from onecomp.components import STATISTICS
from onecomp.testing import FormatSuite, PluginSuite, QuantizerSuite, strategies as ost
from onecomp.testing.suites import sqnr_db

FAILURE = (AssertionError, pytest.fail.Exception)
fast = settings(derandomize=True, max_examples=25, deadline=None, database=None)


# ------------------------------------------------------------------ strategies


@fast
@given(data=st.data())
def test_shapes_and_group_sizes_are_valid(data):
    out, inn = data.draw(ost.shapes(max_out=8, max_in=40))
    assert 1 <= out <= 8 and 1 <= inn <= 40
    g = data.draw(ost.group_sizes(inn))
    assert g == -1 or g >= 1
    _, inn16 = data.draw(ost.shapes(max_in=100, multiple_of=16))
    assert inn16 % 16 == 0 and 16 <= inn16 <= 96
    assert 1 <= data.draw(ost.bit_widths(2, 4)) <= 4 and data.draw(ost.bit_widths(2, 4)) >= 2
    assert data.draw(ost.float_dtypes()).is_floating_point


@fast
@given(data=st.data())
def test_weights_are_finite_with_edge_cases(data):
    shape = data.draw(ost.shapes(max_out=6, max_in=20))
    dtype = data.draw(ost.float_dtypes())
    W = data.draw(ost.weights(shape, dtype, subnormals=True))
    assert W.shape == shape and W.dtype == dtype and torch.isfinite(W).all()
    assert W.abs().max() <= 1e4


def test_weights_cover_zero_and_constant_rows_and_outliers():
    seen = {"zero": False, "constant": False, "outlier": False}

    @settings(derandomize=True, max_examples=60, deadline=None, database=None)
    @given(ost.weights((6, 12)))
    def check(W):
        seen["zero"] |= bool((W == 0).all(1).any())
        seen["constant"] |= bool(((W == W[:, :1]).all(1) & (W[:, 0] != 0)).any())
        seen["outlier"] |= bool((W.abs() == 1e4).any())

    check()
    assert all(seen.values()), seen


@attrs.define
class Knobs:
    bits: int = attrs.field(default=4, validator=in_range(2, 8))
    mode: str = "sym"


@fast
@given(ost.configs(Knobs, bits=st.integers(0, 10)), ost.param_dicts(Knobs, mode=st.just("asym")))
def test_configs_are_valid_instances(cfg, d):
    assert isinstance(cfg, Knobs) and 2 <= cfg.bits <= 8 and cfg.mode == "sym"
    assert d == {"bits": 4, "mode": "asym"}


@pytest.mark.parametrize("needs", [(), ("hessian",), ("cross", "diag"), tuple(sorted(STATISTICS))])
def test_make_task_carries_exactly_the_needed_statistics(needs):
    task = ost.make_task((8, 20), needs, seed=5)
    assert task.shape == (8, 20)
    for stat, field in [("hessian", "H"), ("cross", "cross"), ("diag", "diag"), ("samples", "samples")]:
        assert (getattr(task.stats, field) is not None) == (stat in needs)
    if "hessian" in needs:
        X = ost.activations(task.stats.n_tokens, 20, 5)
        torch.testing.assert_close(task.stats.H, 2 / X.shape[0] * X.T @ X)
    again = ost.make_task((8, 20), needs, seed=5)
    assert torch.equal(again.W, task.W)
    with pytest.raises(ValueError, match="unknown statistics"):
        ost.make_stats(torch.ones(4, 2), {"gradients"})


def test_sqnr():
    W = torch.ones(4, 4)
    assert sqnr_db(W, W) == float("inf")
    assert sqnr_db(W, 0.9 * W) == pytest.approx(20.0)


# ------------------------------------------------------------------ a toy quantizer through QuantizerSuite


@attrs.define
class ToyConfig:
    bits: int = attrs.field(default=4, validator=in_range(2, 8))
    group_size: int = -1


class ToyRTN(Quantizer):
    """Symmetric round-to-nearest on an absmax grid, stored dense (fake quantization)."""

    name = "toy-rtn"
    Config = ToyConfig
    needs = frozenset({"hessian"})

    def quantize(self, task):
        assert task.stats.H is not None and task.stats.cross is None  # exactly what it declared
        W = task.W
        if not torch.isfinite(W).all():
            raise ValueError(f"{task.name}: the weight has non-finite values")
        g = W.shape[1] if self.config.group_size == -1 else self.config.group_size
        qmax = 2 ** (self.config.bits - 1) - 1
        W_hat = torch.empty_like(W)
        for s in range(0, W.shape[1], g):  # the last group may be shorter
            block = W[:, s:s + g]
            scale = block.abs().amax(1, keepdim=True).clamp(min=1e-12) / qmax
            W_hat[:, s:s + g] = torch.clamp(torch.round(block / scale), -qmax, qmax) * scale
        return Compressed(Dense.from_dict({"dtype": "float32"}), {"weight": W_hat.contiguous()}, task.shape)


class MutatesHessian(ToyRTN):
    name = "toy-mutates"

    def quantize(self, task):
        task.stats.H.diagonal().add_(0.01)  # damping in place: corrupts the statistic q/k/v share
        return super().quantize(task)


class AcceptsNaN(ToyRTN):
    name = "toy-nan"
    needs = frozenset()

    def quantize(self, task):
        return Compressed(Dense.from_dict({"dtype": "float32"}), {"weight": task.W.clone()}, task.shape)


class Jittery(ToyRTN):
    name = "toy-jittery"

    def quantize(self, task):
        c = super().quantize(task)
        c.tensors["weight"] = c.tensors["weight"] + 1e-6 * torch.randn(())  # unseeded
        return c


class WrongFormat(ToyRTN):
    name = "toy-wrongformat"

    def quantize(self, task):
        c = super().quantize(task)
        c.tensors["weight"] = c.tensors["weight"].half()  # params say float32
        return c


@hookimpl
def register_quantizers(register):
    for cls in (ToyRTN, MutatesHessian, AcceptsNaN, Jittery, WrongFormat):
        register(cls)


TOY_REGISTRY = Registry(entry_points=False)
_TOYS = contextlib.ExitStack()
_TOYS.enter_context(TOY_REGISTRY.temporarily(sys.modules[__name__], name="toys", dist="onecomp-toys"))


class TestToyQuantizer(QuantizerSuite):
    component = "toy-rtn"
    registry = TOY_REGISTRY
    configs = [{"bits": 4}, {"bits": 3, "group_size": 32}, {"bits": 2, "group_size": 100}]
    min_sqnr_db = {4: 17.0, 3: 11.5, 2: 2.0}


class TestToyQuantizerOutputSQNR(QuantizerSuite):
    component = "toy-rtn"
    registry = TOY_REGISTRY
    configs = [{"bits": 4, "group_size": 64}]
    min_sqnr_db = {4: 17.0}
    sqnr_space = "output"
    shape = (16, 96)

    test_edge_case_weights = None  # covered above; this class only exercises sqnr_space


@pytest.mark.parametrize("name, test", [
    ("toy-mutates", "test_inputs_not_modified"),
    ("toy-nan", "test_non_finite_weights_refused"),
    ("toy-jittery", "test_deterministic_with_a_seed"),
    ("toy-wrongformat", "test_output_is_a_valid_registered_format"),
])
def test_quantizer_suite_catches_broken_quantizers(name, test):
    suite = type("Suite", (QuantizerSuite,), {"component": name, "registry": TOY_REGISTRY, "configs": [{}]})
    with pytest.raises(FAILURE + (Exception,)) as info:
        getattr(suite(), test)()
    assert not isinstance(info.value, (TypeError, AttributeError)), info.value


def test_quantizer_suite_catches_a_low_sqnr():
    suite = type("Suite", (QuantizerSuite,), {"component": "toy-rtn", "registry": TOY_REGISTRY,
                                              "configs": [{"bits": 2}], "min_sqnr_db": {2: 30.0}})
    with pytest.raises(AssertionError, match="below the floor 30.0 dB"):
        suite().test_sqnr_above_floor()


# ------------------------------------------------------------------ FormatSuite catches broken formats


class WrongBits(Dense):
    def expected_bits(self, shape):
        return super().expected_bits(shape) + 8


class LaxCheck(Dense):
    def check(self, stored, shape):
        pass


class NoisyPack(Dense):
    def pack(self, fields, shape):
        w = super().pack(fields, shape)["weight"]
        return {"weight": w + torch.rand(w.shape).to(w.dtype)}


class LossyUnpack(Dense):
    def unpack(self, stored, shape):
        return {"weight": stored["weight"].float()}


class Detached(Dense):
    def dequantize_fields(self, fields, shape):
        return fields["weight"].detach().float()


class SnapsAway(Dense):
    """Claims its float weight is a discrete field: snapping the latent changes the stored values."""
    discrete = {"weight": "integer"}


class DropsBias(Dense):
    def linear(self, x, stored, shape, bias=None):
        return super().linear(x, stored, shape, None)


@attrs.define
class AnyDtype:
    dtype: str = "float16"


class LaxParams(Dense):
    Config = AnyDtype


@pytest.mark.parametrize("cls, test", [
    (WrongBits, "test_bits_per_weight_is_exact"),
    (LaxCheck, "test_check_accepts_valid_and_refuses_bad_tensors"),
    (NoisyPack, "test_identical_bytes_for_identical_inputs"),
    (NoisyPack, "test_dequantize_matches_reference"),
    (LossyUnpack, "test_pack_unpack_round_trip"),
    (Detached, "test_trainable_fields_take_gradients"),
    (SnapsAway, "test_discrete_fields_train_through_latents"),
    (DropsBias, "test_linear_matches_dequantize"),
    (LaxParams, "test_invalid_params_refused"),
])
def test_format_suite_catches_broken_formats(cls, test):
    suite = type("Suite", (FormatSuite,), {
        "component": cls, "invalid_params": [{"dtype": "int8"}], "max_out": 8, "max_in": 24,
        "params": classmethod(lambda c: st.just({"dtype": "float16"})),
    })
    with pytest.raises(FAILURE):
        getattr(suite(), test)()


def test_format_suite_needs_a_component():
    with pytest.raises(pytest.fail.Exception, match="component must name a registered format"):
        FormatSuite().test_registered()


# ------------------------------------------------------------------ PluginSuite on throwaway distributions

TOY_PLUGIN = """
from onecomp import hookimpl
from onecomp.builtin.dense import Dense


class ToyDense(Dense):
    name = "toy-dense"


@hookimpl
def register_formats(register):
    register(ToyDense)
"""

GREEDY_PLUGIN = """
import heavydep_for_tests  # a heavy dependency imported eagerly
from onecomp import hookimpl
from onecomp.builtin.dense import Dense


class GreedyDense(Dense):
    name = "greedy-dense"


@hookimpl
def register_formats(register):
    import onecomp_toy.plugin  # reaches into a sibling plugin
    register(GreedyDense)
"""


def _distribution(site, dist, package, source):
    (site / package).mkdir()
    (site / package / "__init__.py").write_text("")
    (site / package / "plugin.py").write_text(textwrap.dedent(source))
    info = site / f"{package}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[onecomp]\n{package.removeprefix('onecomp_')} = {package}.plugin\n")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A directory holding two installed-looking plugin distributions."""
    root = tmp_path_factory.mktemp("site")
    _distribution(root, "onecomp-toy", "onecomp_toy", TOY_PLUGIN)
    _distribution(root, "onecomp-greedy", "onecomp_greedy", GREEDY_PLUGIN)
    (root / "heavydep_for_tests.py").write_text("")
    return root


@pytest.fixture
def installed(site, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    yield
    for name in [m for m in sys.modules if m.startswith(("onecomp_toy", "onecomp_greedy", "heavydep_for_tests"))]:
        del sys.modules[name]


@pytest.mark.usefixtures("installed")
class TestToyPlugin(PluginSuite):
    distribution = "onecomp_toy"  # any spelling of the name
    names = {"format": ["toy-dense"]}


@pytest.mark.usefixtures("installed")
class TestPluginSuiteCatches:
    def suite(self, **attrs_):
        return type("Suite", (PluginSuite,), {"distribution": "onecomp-greedy", **attrs_})()

    def test_heavy_and_sibling_imports(self):
        with pytest.raises(AssertionError) as info:
            self.suite(forbidden_modules=("heavydep_for_tests",)).test_import_is_light()
        assert "loads ['heavydep_for_tests']" in str(info.value)
        assert "loads other plugins ['onecomp_toy']" in str(info.value)

    def test_undeclared_names(self):
        self.suite(names={"format": ["greedy-dense"]}).test_names_register()
        with pytest.raises(AssertionError, match="registers \\[\\('format', 'greedy-dense'\\)\\]"):
            self.suite(names={"format": ["other"]}).test_names_register()

    def test_missing_distribution(self):
        with pytest.raises(pytest.fail.Exception, match="has no entry point in group 'onecomp'"):
            self.suite(distribution="onecomp-not-installed").test_entry_points_load()


# ------------------------------------------------------------------ the pytest plugin


def test_fixtures(registry, tiny_llama, calib_batch):
    assert registry is not Registry.default() and "dense" in registry.names("format")
    cfg = tiny_llama.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == (2, 64, 128, 4, 2, 256)
    assert not tiny_llama.training and cfg.use_cache is False
    assert calib_batch.shape == (4, 32) and calib_batch.max() < 256
    from onecomp.testing import make_tiny_llama, tiny_llama_config

    again = make_tiny_llama(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), tiny_llama.parameters()))
    assert tiny_llama_config(num_hidden_layers=3).num_hidden_layers == 3


def test_hypothesis_profiles_are_registered():
    ci = settings.get_profile("ci")
    assert ci.derandomize and ci.max_examples == 25 and ci.deadline is None
    assert settings.get_profile("dev").max_examples == 100


def test_pytest_plugin_is_cheap_to_import():
    code = textwrap.dedent("""
        import json, sys
        import onecomp.testing.pytest_plugin
        print(json.dumps([m for m in ("transformers", "hypothesis", "safetensors", "onecomp.testing.suites")
                          if m in sys.modules]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
