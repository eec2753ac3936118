"""Integration tests on the real embedded model (SmolLM2-135M) and corpus: minutes, not seconds."""

import json

import pytest

import onecomp
from onecomp.evaluation import eval_windows, perplexity
from onecomp.models import inspect_model, load_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m")


def test_fp32_perplexity_matches_the_protocol(smollm):
    """docs/protocol.md: fp32 SmolLM2-135M has ppl 15.02 on the KJV gospels (40 × 512 tokens)."""
    ppl = perplexity(smollm.model, eval_windows(smollm.tokenizer, "kjv-gospels", 40, 512))
    assert ppl == pytest.approx(15.02, abs=0.01)


def test_inspection_of_the_embedded_model(smollm):
    insp = inspect_model(smollm.model)
    assert len(insp.blocks) == 30 and insp.hidden_size == 576
    assert insp.blocks[0].groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                     ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def _run(tmp_path, name, quantizer, refiners=()):
    cfg = {"model": {"id": "smollm2-135m"},
           "calibration": {"corpus": "kjv", "samples": 16, "seq_len": 256},
           "plan": {"quantizer": quantizer}, "refiners": list(refiners),
           "evaluation": {"texts": ["kjv-gospels", "pydoc-topics"], "windows": 8, "seq_len": 512, "before": False},
           "output": {"dir": str(tmp_path / name)}}
    return onecomp.run(cfg, progress=False)["stages"][0]


@pytest.fixture(scope="module")
def three_bit(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int")
    return {
        "rtn": _run(tmp, "rtn", {"name": "rtn", "bits": 3, "group_size": 128}),
        "gptq": _run(tmp, "gptq", {"name": "gptq", "bits": 3, "group_size": 128}),
        "gptq+qep": _run(tmp, "qep", {"name": "gptq", "bits": 3, "group_size": 128}, [{"name": "qep"}]),
    }


def test_gptq_beats_rtn_at_3_bits_on_the_real_model(three_bit):
    assert three_bit["gptq"]["ppl"]["kjv-gospels"] < 0.8 * three_bit["rtn"]["ppl"]["kjv-gospels"]
    assert three_bit["gptq"]["ppl"]["pydoc-topics"] <= three_bit["rtn"]["ppl"]["pydoc-topics"]


def test_qep_improves_gptq_at_3_bits_on_the_real_model(three_bit):
    """In domain QEP's gain is robust: 20.4–22.2 against GPTQ's 24.47 over nine fixed dampings from
    0.01 to 1 (the default, in / N, is 0.140625 here). Out of domain, on these 4096 calibration tokens and 8
    windows, the figure swings between 46.4 and 65.9 (GPTQ: 50.49; 46.43 at damping 0.14, 65.18 at
    0.140625): swapping blocks between those two models traced it to small changes spread over the last
    blocks (block 29's down_proj alone +5.5), not to one broken layer. So out of domain the test asks only
    that QEP stays below RTN (84.77), as GPTQ must. See plugins/onecomp-qep/README.md, "Damping"."""
    assert three_bit["gptq+qep"]["ppl"]["kjv-gospels"] < 0.9 * three_bit["gptq"]["ppl"]["kjv-gospels"]
    assert three_bit["gptq+qep"]["ppl"]["pydoc-topics"] < three_bit["rtn"]["ppl"]["pydoc-topics"]


def test_checkpoint_reloads_with_the_same_perplexity(three_bit, smollm):
    path = three_bit["gptq"]["checkpoint"]
    manifest = json.loads(open(f"{path}/onecomp.json").read())
    assert len(manifest["modules"]) == 210
    model = onecomp.load(path, backend=None)  # the reference path the stage evaluated
    ppl = perplexity(model, eval_windows(smollm.tokenizer, "kjv-gospels", 8, 512))
    assert ppl == pytest.approx(three_bit["gptq"]["ppl"]["kjv-gospels"], rel=1e-4)
