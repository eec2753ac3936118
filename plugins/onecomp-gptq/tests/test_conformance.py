"""The gptq format, the gptq and rtn quantizers, and the plugin through onecomp's conformance kit."""

import torch
from hypothesis import strategies as st

from onecomp.testing import FormatSuite, PluginSuite, QuantizerSuite


class TestGPTQFormat(FormatSuite):
    component = "gptq"
    invalid_params = [{"bits": 0}, {"bits": 9}, {"group_size": 0}, {"group_size": -2}, {"bits": "4"},
                      {"act_order": "yes"}, {"sym": True}]

    @classmethod
    def params_for(cls, shape):
        return st.fixed_dictionaries({
            "bits": st.integers(1, 8),
            "group_size": st.one_of(st.just(-1), st.integers(1, shape[1] + 3)),
            "act_order": st.booleans(),
        })

    def reference_dequantize(self, fmt, fields, shape):
        """Ŵ_ij = s_g (q_ij − z_g), element by element, with g = g_idx[j]."""
        g = shape[1] if fmt.params.group_size == -1 else fmt.params.group_size
        g_idx = fields.get("g_idx", torch.arange(shape[1]) // g)
        W = torch.empty(shape)
        for j in range(shape[1]):
            k = int(g_idx[j])
            W[:, j] = fields["scales"][:, k].float() * (fields["q"][:, j].float() - fields["zeros"][:, k].float())
        return W


class TestGPTQQuantizer(QuantizerSuite):
    component = "gptq"
    configs = [{"bits": 4, "group_size": 128}, {"bits": 3, "group_size": -1}, {"bits": 8, "group_size": 32},
               {"bits": 2, "group_size": 64, "sym": True, "act_order": False, "mse": True}]
    sqnr_space = "output"  # GPTQ minimises the output error ‖(W − Ŵ)X‖, not the weight error
    min_sqnr_db = {8: 46.0, 4: 20.0, 3: 13.0, 2: 7.0}


class TestRTNQuantizer(QuantizerSuite):
    component = "rtn"
    configs = [{"bits": 4, "group_size": 128}, {"bits": 3, "group_size": -1}, {"bits": 2, "group_size": 16,
                                                                              "mse": True}]
    min_sqnr_db = {4: 18.0, 3: 11.0, 2: 8.0}


class TestGPTQPlugin(PluginSuite):
    distribution = "onecomp-gptq"
    names = {"quantizer": ["gptq", "rtn"], "format": ["gptq"]}
