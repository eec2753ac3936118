"""The built-in ``dense`` format through the conformance kit."""

from hypothesis import strategies as st

from onecomp import Registry
from onecomp.testing import FormatSuite


class TestDenseFormat(FormatSuite):
    component = "dense"
    registry = Registry(entry_points=False)  # the built-in alone, whatever else is installed
    invalid_params = [{"dtype": "int8"}, {"dtype": "float64"}, {"dtype": 16}, {"bits": 4}]

    @classmethod
    def params(cls):
        return st.fixed_dictionaries({"dtype": st.sampled_from(["float16", "bfloat16", "float32"])})

    def reference_dequantize(self, fmt, fields, shape):
        return fields["weight"].float()
