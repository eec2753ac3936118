"""Conformance tests for the template plugin, from onecomp's testing kit.

They need the plugin installed (``pip install -e contrib/template``): components
are looked up in the registry by name, as a pipeline would. Without it the whole
module is skipped.
"""

import pytest

pytest.importorskip("onecomp_example", reason="install the template first: pip install -e contrib/template")

import torch  # noqa: E402

from onecomp import FormatError, Registry  # noqa: E402
from onecomp.testing import FormatSuite, PluginSuite, QuantizerSuite  # noqa: E402
from onecomp.testing.strategies import make_task  # noqa: E402


def test_components_are_installed():
    registry = Registry.default()
    assert "example-absmax" in registry.names("quantizer")
    assert "example-int8" in registry.names("format")


class TestExampleInt8(FormatSuite):
    component = "example-int8"
    invalid_params = [{"bits": 8}]  # the format takes no params at all

    def reference_dequantize(self, fmt, fields, shape):
        return fields["scale"].float()[:, None] * fields["codes"].float()


class TestExampleAbsmax(QuantizerSuite):
    component = "example-absmax"
    configs = [{}, {"clip": 0.9}]
    min_sqnr_db = {None: 30.0}  # these configs have no `bits`: the None key is their floor


class TestPlugin(PluginSuite):
    distribution = "onecomp-example"
    names = {"quantizer": ["example-absmax"], "format": ["example-int8"]}


# ------------------------------------------------------------ beyond the kit: this format's own invariants


@pytest.mark.parametrize("fields, message", [
    ({"codes": torch.full((2, 3), -128, dtype=torch.int16), "scale": torch.ones(2)}, "codes must be integers"),
    ({"codes": torch.zeros(2, 3), "scale": torch.ones(2)}, "codes must be integers"),
    ({"codes": torch.zeros(2, 4, dtype=torch.int8), "scale": torch.ones(2)}, "do not fit shape"),
    ({"codes": torch.zeros(2, 3, dtype=torch.int8), "scale": torch.ones(2, 1)}, "do not fit shape"),
    ({"codes": torch.zeros(2, 3, dtype=torch.int8), "scale": torch.tensor([1.0, -1.0])}, "finite and >= 0"),
    ({"codes": torch.zeros(2, 3, dtype=torch.int8), "scale": torch.tensor([1.0, 1e6])}, "finite and >= 0"),
])
def test_pack_refuses_invalid_fields(fields, message):
    fmt = Registry.default().get("format", "example-int8")()
    with pytest.raises(FormatError, match=message):
        fmt.pack(fields, (2, 3))


def test_quantizer_reconstructs_the_row_maximum():
    task = make_task((8, 64))
    c = Registry.default().get("quantizer", "example-absmax")().quantize(task)
    assert c.format.name == "example-int8" and c.tensors["codes"].abs().amax(1).eq(127).all()
    W_hat = Registry.default().get("format", "example-int8")().dequantize(c.tensors, task.shape)
    torch.testing.assert_close(W_hat.abs().amax(1), task.W.abs().amax(1), rtol=1e-3, atol=0)


def test_zero_rows_stay_zero():
    W = torch.randn(4, 16)
    W[1] = 0
    c = Registry.default().get("quantizer", "example-absmax")().quantize(make_task(W))
    assert c.tensors["scale"][1] == 0 and not c.tensors["codes"][1].any()
