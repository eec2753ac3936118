"""Tiny random models for tests (transformers is imported only when one is built)."""

from __future__ import annotations

import torch

TINY_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False, use_cache=False)


def tiny_llama_config(**overrides):
    """A ``LlamaConfig`` with 2 blocks, hidden 64, intermediate 128, 4 heads, 2 kv heads, vocab 256."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY_LLAMA, **overrides})


def make_tiny_llama(seed: int = 0, **overrides):
    """A seeded random ``LlamaForCausalLM`` built from ``tiny_llama_config`` (CPU, fp32, eval mode)."""
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(**overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    model.config.use_cache = False
    return model
