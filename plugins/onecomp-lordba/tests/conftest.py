"""A tiny random Llama over the SmolLM2 vocabulary, saved with the real tokenizer, and a registry with a
crude test quantizer (one magnitude per row into format ``dense``) so the base has much to recover."""

import pytest
import torch

import onecomp
from onecomp import Compressed, Quantizer, hookimpl


class RowSign(Quantizer):
    name = "test-rowsign"

    def quantize(self, task):
        W_hat = task.W.sign() * task.W.abs().mean(1, keepdim=True)
        fmt = onecomp.Registry.default().get("format", "dense").from_dict({"dtype": "float32"})
        return Compressed(fmt, {"weight": W_hat.contiguous()}, task.shape)


class Components:
    @hookimpl
    def register_quantizers(self, register):
        register(RowSign)


@pytest.fixture
def registry():
    reg = onecomp.Registry()
    with reg.temporarily(Components(), name="lordba-test-components"):
        yield reg


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from onecomp.models import load_model

    tok = load_model("smollm2-135m").tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def run_config():
    """A pipeline config on ``tiny_dir`` with the test quantizer: 4 × 64 calibration tokens, 2 evaluation windows."""
    return lambda model_dir, out, refiners: {
        "model": {"id": str(model_dir)},
        "calibration": {"corpus": "kjv", "samples": 4, "seq_len": 64, "batch_size": 2},
        "plan": {"planner": "uniform", "quantizer": {"name": "test-rowsign"}},
        "refiners": refiners,
        "evaluation": {"texts": ["kjv-gospels"], "windows": 2, "seq_len": 64},
        "output": {"dir": str(out)},
    }
