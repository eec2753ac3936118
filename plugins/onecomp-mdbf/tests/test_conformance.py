"""The mdbf format, the mdbf quantizer and the plugin through onecomp's conformance kit."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from onecomp.testing import FormatSuite, PluginSuite, QuantizerSuite
from onecomp.testing import strategies as ost
from onecomp.testing.suites import _settings
from onecomp_mdbf import rank_for


class TestMDBFFormat(FormatSuite):
    component = "mdbf"
    max_out, max_in = 48, 120
    invalid_params = [{"rank": 0}, {"envelope_rank": 0}, {"terms": 0}, {"rank": "8"}, {"terms": 1.5},
                      {"rank": True}, {"envelope_rank": -1}]

    @classmethod
    def params_for(cls, shape):
        """Ranks as the quantizer would pick them for a drawn bit target (at least 1, at most 40)."""
        n, m = shape

        def build(d):
            r = rank_for(n, m, d["envelope_rank"], d["terms"], d["target_bpw"])
            return {"rank": min(max(r, 1), 40), "envelope_rank": d["envelope_rank"], "terms": d["terms"]}

        return st.fixed_dictionaries({"envelope_rank": st.integers(1, 3), "terms": st.integers(1, 3),
                                      "target_bpw": st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, 16.0])}).map(build)

    def reference_dequantize(self, fmt, fields, shape):
        """Ŵ = Σ_p Σ_k f_k g_kᵀ, one rank-one product per middle index, entries written out."""
        f = {k: v.double() for k, v in fields.items()}
        W = torch.zeros(shape, dtype=torch.float64)
        for p in range(fmt.params.terms):
            for k in range(fmt.params.rank):
                col = f["S_A"][p, :, k] * (f["A"][p] * f["Q_U"][p, k]).sum(1)  # F[:, k]
                row = f["S_B"][p, k, :] * (f["B"][p] * f["Q_V"][p, k]).sum(1)  # G[k, :]
                W += torch.outer(col, row)
        return W


class TestMDBFQuantizer(QuantizerSuite):
    component = "mdbf"
    configs = [{"target_bpw": 2.0, "iterations": 10},
               {"target_bpw": 2.0, "envelope_rank": 2, "terms": 1, "iterations": 10},
               {"target_bpw": 1.5, "terms": 1, "importance": False, "iterations": 10, "inner": 2}]
    sqnr_space = "output"  # with importance the fit weights input columns by sqrt(E[x²])
    # a random 48×160 layer at ~2 bits keeps about 3–5 dB; a zero weight would score 0 dB
    min_sqnr_db = {None: 2.5}

    @_settings(max_examples=10)
    @given(data=st.data())
    def test_edge_case_weights(self, data):
        """Zero rows, constant rows and ±1e4 outliers give a finite reconstruction; a shape too small
        for one rank at the target is refused with an error naming target_bpw."""
        cfg = data.draw(st.sampled_from([*self.configs, {"target_bpw": 8.0, "terms": 1, "iterations": 3}]))
        shape = data.draw(ost.shapes(self.edge_max_out, self.edge_max_in), label="shape")
        W = data.draw(ost.weights(shape), label="W")
        task = self.make_task(W, seed=data.draw(st.integers(0, 2**16), label="seed"))
        quantizer = self.make_quantizer(cfg)
        if quantizer.rank(shape) < 1:
            with pytest.raises(ValueError, match="target_bpw"):
                quantizer.quantize(task)
            return
        c, fmt = self.quantize(cfg, task)
        assert torch.isfinite(fmt.dequantize(c.tensors, task.shape)).all(), "non-finite reconstruction"


class TestMDBFPlugin(PluginSuite):
    distribution = "onecomp-mdbf"
    names = {"quantizer": ["mdbf"], "format": ["mdbf"]}
