"""A multimodal model's directory (Gemma 3 4b, Qwen2-VL: a vision tower beside the language model)
given to `hf-causal-lm` is refused at validation, by name: it used to load whole, train, and then
fail in transformers' generate ("doesn't have its forwarding implemented") after a stage-2 run."""

from __future__ import annotations

import json

import pytest

from vlbridge.plugins.llms.hf_causal_lm import HFCausalLMOptions

TEXT = dict(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=14)


@pytest.mark.parametrize("model_type", ["gemma3", "qwen2_vl", "paligemma"])
def test_a_multimodal_directory_is_refused_by_name(model_type, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "text_config": TEXT, "vision_config": VISION}))
    with pytest.raises(ValueError, match=f"holds a multimodal '{model_type}' model .*text-only"):
        HFCausalLMOptions(model=str(tmp_path))


def test_a_text_only_gemma3_directory_is_accepted(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text", **TEXT}))
    assert HFCausalLMOptions(model=str(tmp_path)).model == str(tmp_path)
