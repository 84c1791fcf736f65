"""What a transformers LLM's config.json says about it, read without torch: the width a soft prompt
must have, the context, whether it is encoder-decoder, and (where the layout is known) its size.

Families name the same things differently (`hidden_size`, `n_embd`, `d_model`; `max_position_embeddings`,
`n_positions`); multimodal configs nest the language model under `text_config`. The parameter counts
are exact for the families listed in `_COUNTS` (tested against the built modules) and a generic estimate
(`hf_size_estimate`) for others.
"""

from __future__ import annotations

from typing import Any, Callable

from vlbridge.plugin.specs import LLMDims, SizeEstimate
from vlbridge.plugins.llms.hf_size_estimate import estimate

WIDTH_KEYS = ("hidden_size", "n_embd", "d_model")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
RELATIVE_POSITIONS = ("t5", "mt5", "umt5", "longt5")  # no hard context: relative position buckets
T5_CONTEXT = 512  # what T5 was trained on; a soft limit
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "smollm3", "olmo2")


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config (multimodal configs nest it under `text_config`)."""
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) else config


def _first(config: dict[str, Any], keys: tuple[str, ...], what: str) -> int:
    for key in keys:
        if isinstance(config.get(key), int):
            return config[key]
    raise ValueError(f"the model's config.json (model_type {config.get('model_type')!r}) has none of {', '.join(keys)}: "
                     f"cannot tell its {what}")


def embed_width(config: dict[str, Any]) -> int:
    """Width of the input embeddings (OPT-350m embeds at `word_embed_proj_dim`, below its hidden size)."""
    config = text_config(config)
    if config.get("model_type") == "opt" and isinstance(config.get("word_embed_proj_dim"), int):
        return config["word_embed_proj_dim"]
    return _first(config, WIDTH_KEYS, "embedding width")


def dims(config: dict[str, Any]) -> LLMDims:
    config = text_config(config)
    encoder_decoder = bool(config.get("is_encoder_decoder", False))
    vocab = config.get("vocab_size") if isinstance(config.get("vocab_size"), int) else None  # None: the plan leaves the logits out
    if config.get("model_type") in RELATIVE_POSITIONS or not any(isinstance(config.get(k), int) for k in CONTEXT_KEYS):
        return LLMDims(embed_width(config), T5_CONTEXT, encoder_decoder, context_is_hard=False, vocab_size=vocab)
    return LLMDims(embed_width(config), _first(config, CONTEXT_KEYS, "context length"), encoder_decoder, vocab_size=vocab)


def _llama_like(c: dict[str, Any]) -> int:
    h, inner, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or h // heads
    kind = c["model_type"]
    attention = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h
    if kind == "qwen2" or c.get("attention_bias"):
        attention += heads * head_dim + 2 * kv * head_dim + (h if kind != "qwen2" else 0)
    if kind == "qwen3":
        attention += 2 * head_dim  # q_norm, k_norm (per head)
    if kind == "olmo2":
        attention += (heads + kv) * head_dim  # q_norm, k_norm (over all heads)
    mlp = 3 * h * inner + ((2 * inner + h) if c.get("mlp_bias") else 0)
    norms = (4 if kind == "gemma2" else 2) * h
    head = 0 if c.get("tie_word_embeddings", kind in ("gemma", "gemma2")) else vocab * h
    return vocab * h + layers * (attention + mlp + norms) + h + head


def _gpt2(c: dict[str, Any]) -> int:
    h, layers, vocab, positions = c["n_embd"], c["n_layer"], c["vocab_size"], c["n_positions"]
    inner = c.get("n_inner") or 4 * h
    block = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * inner + inner) + (inner * h + h)
    head = 0 if c.get("tie_word_embeddings", True) else vocab * h
    return vocab * h + positions * h + layers * block + 2 * h + head


def _phi(c: dict[str, Any]) -> int:
    h, inner, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    heads = c["num_attention_heads"]
    kv, head_dim = c.get("num_key_value_heads") or heads, h // heads
    attention = 2 * (h * h + h) + 2 * (h * kv * head_dim + kv * head_dim)  # q, dense; k, v (grouped)
    qk_norms = 4 * head_dim if c.get("qk_layernorm") else 0  # LayerNorms on q and k, per head
    block = 2 * h + attention + qk_norms + (h * inner + inner) + (inner * h + h)
    head = vocab + (0 if c.get("tie_word_embeddings") else vocab * h)  # lm_head's bias stays when tied
    return vocab * h + layers * block + 2 * h + head


def _t5(c: dict[str, Any]) -> int:
    d, ff, heads, d_kv, vocab = c["d_model"], c["d_ff"], c["num_heads"], c["d_kv"], c["vocab_size"]
    layers = c["num_layers"]
    decoder_layers = c.get("num_decoder_layers") or layers
    buckets = c.get("relative_attention_num_buckets", 32)
    attention = 4 * d * heads * d_kv + d  # q, k, v, o (no bias) + RMS norm
    ffn = (3 if str(c.get("feed_forward_proj", "relu")).startswith("gated") else 2) * d * ff + d
    encoder = layers * (attention + ffn) + buckets * heads + d
    decoder = decoder_layers * (2 * attention + ffn) + buckets * heads + d
    head = 0 if c.get("tie_word_embeddings", True) else vocab * d
    return vocab * d + encoder + decoder + head


def _opt(c: dict[str, Any]) -> int:
    from vlbridge.plugins.llms.opt import arch_of, count_params

    return count_params(arch_of(c))


_COUNTS: dict[str, Callable[[dict[str, Any]], int]] = {
    **{kind: _llama_like for kind in LLAMA_LIKE}, "gpt2": _gpt2, "phi": _phi, "opt": _opt, **{kind: _t5 for kind in ("t5", "mt5")},
}


def num_params(config: dict[str, Any]) -> int | SizeEstimate | None:
    """Parameters of the model the config describes: exact for the families whose layout is known,
    else a generic estimate (or, where none fits, no count and why)."""
    config = text_config(config)
    kind = str(config.get("model_type"))
    count = _COUNTS.get(kind)
    try:
        if count is not None:
            return count(config)
        if kind in RELATIVE_POSITIONS:  # umT5, LongT5: T5's layout plus a little (per-layer position buckets, global attention)
            return SizeEstimate(_t5(config), "T5's formula")
    except (KeyError, TypeError):  # a config that leaves a field to its class default: size unknown
        return None
    return estimate(config)
