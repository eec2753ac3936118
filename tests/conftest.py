"""Shared fixtures for core tests: a tiny random Llama saved as an HF directory with a real tokenizer."""

import pytest


@pytest.fixture(scope="session")
def embedded_tokenizer():
    """The SmolLM2 tokenizer (converted from the embedded GGUF once, then cached)."""
    from onecomp.models import load_model

    return load_model("smollm2-135m").tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_tokenizer):
    """An HF directory holding a seeded 2-block random Llama over the SmolLM2 vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(embedded_tokenizer), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model.save_pretrained(path)
    embedded_tokenizer.save_pretrained(path)
    return path
