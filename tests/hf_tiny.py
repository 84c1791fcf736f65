"""Tiny random transformers BLIP-2 directories, written with save_pretrained, for parity tests and
the benchmarks. Weights are redrawn wider than transformers' init so outputs are not degenerate."""

from __future__ import annotations

from pathlib import Path

import torch

from vlbridge.plugins.tiny_assets import tokenizer_dir

IMAGE_SIZE, PATCH, NUM_QUERIES = 28, 14, 4
IMAGE_TOKEN = 1000  # an id the tiny tokenizers never produce, below the tiny vocab of 1024


def _vision() -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE_SIZE,
                patch_size=PATCH, initializer_range=0.02, layer_norm_eps=1e-6)


def _qformer(text_input: bool = False) -> dict:
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=1024,
                max_position_embeddings=64, encoder_hidden_size=32, cross_attention_frequency=1, use_qformer_text_input=text_input)


def _text(llm: str) -> dict:
    from transformers import OPTConfig, T5Config

    if llm == "llama":  # a generic causal LM (Vicuna's family): imported as hf-causal-lm
        return dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=1024, max_position_embeddings=128, eos_token_id=2, pad_token_id=1, bos_token_id=2)
    if llm == "opt":
        return OPTConfig(vocab_size=1024, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                         max_position_embeddings=64, word_embed_proj_dim=32, eos_token_id=2, pad_token_id=1, bos_token_id=2).to_dict()
    return T5Config(vocab_size=1024, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, feed_forward_proj="gated-gelu",
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1).to_dict()


NORM_NAMES = ("norm", "ln_", "ln.", "layrnorm", "ln_f")  # LayerNorm / RMSNorm parameters across the families


def redraw(model: torch.nn.Module, std: float = 0.15, seed: int = 0) -> None:
    """Wider random weights: transformers' tiny inits make every output token the same. Norm scales
    stay near 1 (1 + noise / 10, and their biases small), so no layer is close to an identity or dead."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            is_norm = any(n in name.lower() for n in NORM_NAMES)
            param.copy_((1.0 if name.endswith("weight") else 0.0) + noise * 0.1 if is_norm else noise)


def make_generation_model(directory: Path, llm: str = "opt", seed: int = 0, *, tokenizer: bool = True, vision: dict | None = None,
                          qformer: dict | None = None, text: dict | None = None):
    """A tiny Blip2ForConditionalGeneration (OPT, Llama or FlanT5) saved with its tokenizer (unless
    `tokenizer` is False); `vision`, `qformer`, `text` override settings of the three configs."""
    from transformers import AutoTokenizer, Blip2Config, Blip2ForConditionalGeneration

    config = Blip2Config(vision_config={**_vision(), **(vision or {})}, qformer_config={**_qformer(), **(qformer or {})},
                         text_config={**_text(llm), **(text or {})}, num_query_tokens=NUM_QUERIES, image_token_index=IMAGE_TOKEN)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    redraw(model, seed=seed)
    model.save_pretrained(directory)
    if tokenizer:
        AutoTokenizer.from_pretrained(tokenizer_dir("flan-t5" if llm == "t5" else "opt")).save_pretrained(directory)
    return model


def make_retrieval_model(directory: Path, seed: int = 0, text_positions: int | None = None):
    """A tiny Blip2ForImageTextRetrieval saved with a BERT tokenizer (its Q-Former with `text_positions`
    text positions where given); returns the model."""
    from transformers import AutoTokenizer, Blip2Config, Blip2ForImageTextRetrieval

    qformer = {**_qformer(text_input=True), **({"max_position_embeddings": text_positions} if text_positions else {})}
    config = Blip2Config(vision_config=_vision(), qformer_config=qformer, num_query_tokens=NUM_QUERIES, image_text_hidden_size=16)
    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(config).eval()
    redraw(model, seed=seed)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_dir("bert")).save_pretrained(directory)
    return model


def pixels(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def assert_same_weights(expected: dict, actual: dict) -> None:
    """Two transformers state dicts hold the same keys and tensors. A BLIP-2-style `qkv.bias` is
    compared on its query and value thirds only: the key bias cannot change attention, so the EVA
    encoder keeps none and exports zeros there."""
    assert set(expected) == set(actual)
    for key, value in expected.items():
        got = actual[key]
        if key.endswith("self_attn.qkv.bias"):
            third = value.shape[0] // 3
            value, got = torch.cat([value[:third], value[2 * third:]]), torch.cat([got[:third], got[2 * third:]])
        torch.testing.assert_close(got, value, msg=key)
