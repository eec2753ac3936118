"""inspect_model on tiny random Llama, Mistral, Qwen2 and Qwen3 models."""

import pytest
import torch
from torch import nn

from onecomp.models import inspect_model
from onecomp.models.structure import find_blocks

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
LINEARS = {
    "self_attn.q_proj": (64, 64),
    "self_attn.k_proj": (32, 64),
    "self_attn.v_proj": (32, 64),
    "self_attn.o_proj": (64, 64),
    "mlp.gate_proj": (128, 64),
    "mlp.up_proj": (128, 64),
    "mlp.down_proj": (64, 128),
}
GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
          ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def build(arch):
    import transformers

    config_cls = getattr(transformers, f"{arch}Config")
    model_cls = getattr(transformers, f"{arch}ForCausalLM")
    extra = {"head_dim": 16} if arch == "Qwen3" else {}
    torch.manual_seed(0)
    return model_cls(config_cls(**TINY, **extra)).eval()


@pytest.mark.parametrize("arch, model_type", [("Llama", "llama"), ("Mistral", "mistral"), ("Qwen2", "qwen2"),
                                              ("Qwen3", "qwen3")])
def test_finds_blocks_linears_and_fused_groups(arch, model_type):
    model = build(arch)
    ins = inspect_model(model)
    assert ins.model_type == model_type
    assert ins.blocks_path == "model.layers"
    assert ins.hidden_size == 64
    assert ins.n_params == sum(p.numel() for p in model.parameters())
    assert [b.prefix for b in ins.blocks] == ["model.layers.0", "model.layers.1"]
    for b in ins.blocks:
        assert set(b.linears) == set(LINEARS) and dict(b.linears) == LINEARS
        assert b.groups == GROUPS
    names = ins.linear_names()
    assert len(names) == 14 and "lm_head" not in names
    assert set(names) == {f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS}
    assert ins.group_of("model.layers.1.self_attn.k_proj") == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]
    assert ins.group_of("model.layers.0.mlp.down_proj") == ["model.layers.0.mlp.down_proj"]
    with pytest.raises(KeyError):
        ins.group_of("lm_head")
    summary = ins.summary()
    assert summary["blocks"] == 2 and summary["fused_groups"] == GROUPS
    assert summary["linears_per_block"]["mlp.down_proj"] == [64, 128]


def test_inspection_removes_its_hooks(tiny_llama):
    inspect_model(tiny_llama)
    for m in tiny_llama.modules():
        assert not m._forward_pre_hooks


def test_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="found no list of decoder blocks"):
        find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
