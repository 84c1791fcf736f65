"""`vlbridge validate`'s LLM sizes for layouts the family tests do not build (tests/test_hf_llms.py
covers one config per family): each declared count, read from the config save_pretrained writes,
equals the parameters transformers builds from it."""

from __future__ import annotations

import json

import pytest

from vlbridge.plugins.llms import hf_dims

_BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
             vocab_size=1000)
CONFIGS = {
    "olmo2": ("olmo2", dict(_BASE, num_key_value_heads=2)),  # q_norm / k_norm over all heads
    "gpt2-untied": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=1000, tie_word_embeddings=False)),
    "phi-tied": ("phi", dict(_BASE, tie_word_embeddings=True)),  # lm_head keeps its bias
    "phi-grouped-kv": ("phi", dict(_BASE, num_key_value_heads=2)),
    "phi-qk-layernorm": ("phi", dict(_BASE, qk_layernorm=True)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_declared_count_equals_the_built_model(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, fields = CONFIGS[name]
    config = AutoConfig.for_model(model_type, **fields)
    built = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert hf_dims.num_params(json.loads(config.to_json_string())) == built
