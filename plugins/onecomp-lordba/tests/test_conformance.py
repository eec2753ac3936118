"""Formats lordba and lora and the plugin through onecomp's conformance kit."""

import torch
from hypothesis import strategies as st

from onecomp.testing import FormatSuite, PluginSuite

class RankParams(FormatSuite):
    max_out, max_in = 48, 120
    invalid_params = [{"rank": 0}, {"rank": "16"}, {"rank": True}, {"rank": -1}, {"rank": 1.5}]

    @classmethod
    def params(cls):
        return st.fixed_dictionaries({"rank": st.integers(1, 20)})


class TestLoRDBAFormat(RankParams):
    component = "lordba"

    def reference_dequantize(self, fmt, fields, shape):
        """ΔW_ij = Σ_k u_B,i S_B,ik v_B,k u_A,k S_A,kj v_A,j, written out term by term."""
        f = {k: v.double() for k, v in fields.items()}
        W = torch.zeros(shape, dtype=torch.float64)
        for k in range(fmt.params.rank):
            col = f["u_B"] * f["S_B"][:, k] * f["v_B"][k]
            row = f["u_A"][k] * f["S_A"][k] * f["v_A"]
            W += torch.outer(col, row)
        return W


class TestLoRAFormat(RankParams):
    component = "lora"

    def reference_dequantize(self, fmt, fields, shape):
        return fields["B"].double() @ fields["A"].double()


class TestPlugin(PluginSuite):
    distribution = "onecomp-lordba"
    names = {"format": ["lordba", "lora"], "refiner": ["lordba"]}
