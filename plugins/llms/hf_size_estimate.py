"""A rough parameter count of a transformers LLM from its config.json, for the families `hf_dims` has
no exact formula for, so that `vlbridge validate` can still say how big the frozen LLM is.

The estimate counts what nearly every decoder (or BART-like encoder-decoder) holds: embeddings,
attention with grouped key/value heads, a plain or gated MLP, norms, learned positions where the
family has them, and the output head unless tied. Details a family adds on top (a parallel block
with one norm, extra norms on q and k, ALiBi's lack of weights) move it by a few percent at most,
so the count is a SizeEstimate, printed with '~'. Layouts the formula does not describe at all
(mixture-of-experts, state-space or recurrent layers) get no number, only the reason.
"""

from __future__ import annotations

from typing import Any

from vlbridge.plugin.specs import SizeEstimate

# Families whose MLP is gate_proj * act(up_proj) -> down_proj (three matrices, RMSNorm, no biases).
GATED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2", "olmo3", "granite",
         "cohere", "cohere2", "stablelm", "internlm2", "exaone", "helium", "glm", "glm4", "smollm3", "ministral", "apertus")
LEARNED_POSITIONS = ("gpt2", "gpt_bigcode", "opt", "biogpt", "bart", "mbart", "blenderbot", "blenderbot-small", "plbart")
POSITION_OFFSET = {"opt": 2, "bart": 2, "mbart": 2, "plbart": 2, "biogpt": 2}  # rows kept before position 0
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
RECURRENT = ("mamba", "mamba2", "falcon_mamba", "jamba", "zamba", "zamba2", "falcon_h1", "bamba", "lfm2", "rwkv",
             "recurrent_gemma", "granitemoehybrid", "nemotron_h", "xlstm", "minimax")
RECURRENT_KEYS = ("state_size", "ssm_state_size", "mamba_d_state", "conv_L_cache")


class _Missing(Exception):
    """The config leaves a size the formula needs to its class default, which is not tabled here."""


def _pick(c: dict[str, Any], *keys: str) -> int:
    for key in keys:
        if isinstance(c.get(key), int) and not isinstance(c.get(key), bool):
            return c[key]
    raise _Missing(" / ".join(keys))


def _optional(c: dict[str, Any], default: int, *keys: str) -> int:
    try:
        return _pick(c, *keys)
    except _Missing:
        return default


def _not_estimable(c: dict[str, Any]) -> str | None:
    """Why no generic formula fits this layout (None: one does)."""
    kind = str(c.get("model_type"))
    if any(isinstance(c.get(k), int) and c[k] > 1 for k in MOE_KEYS) or "moe" in kind:
        return f"mixture-of-experts model ({kind}): its size is not estimated"
    if kind in RECURRENT or any(k in c for k in RECURRENT_KEYS):
        return f"state-space / recurrent layers ({kind}): its size is not estimated"
    return None


def _attention(c: dict[str, Any], h: int, bias: bool) -> int:
    heads = _pick(c, "num_attention_heads", "n_head", "num_heads", "n_heads")
    kv = _optional(c, 1 if c.get("multi_query") and not c.get("new_decoder_architecture") else heads,
                   "num_key_value_heads", "num_kv_heads")
    head_dim = _optional(c, h // heads, "head_dim")
    weights = 2 * h * heads * head_dim + 2 * h * kv * head_dim  # q and o, k and v
    return weights + ((heads + 2 * kv) * head_dim + h if bias else 0)


def _mlp(c: dict[str, Any], h: int, gated: bool, bias: bool) -> int:
    inner = _optional(c, 4 * h, "intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")
    return (3 if gated else 2) * h * inner + ((inner * (2 if gated else 1) + h) if bias else 0)


def _head(c: dict[str, Any], vocab: int, h: int) -> int:
    return 0 if c.get("tie_word_embeddings", True) else vocab * h  # absent: PretrainedConfig's default, tied


def _decoder(c: dict[str, Any]) -> tuple[int, list[str]]:
    kind = str(c.get("model_type"))
    h = _pick(c, "hidden_size", "n_embd", "d_model", "n_embed")
    layers = _pick(c, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    vocab = _pick(c, "vocab_size")
    guesses = []
    gated = kind in GATED or (kind not in LEARNED_POSITIONS and c.get("hidden_act") in ("silu", "swish"))
    if kind not in GATED:
        guesses.append(f"{'a gated' if gated else 'a plain'} MLP")
    flags = [c[k] for k in ("attention_bias", "bias", "use_bias", "add_bias_linear") if isinstance(c.get(k), bool)]
    bias = flags[0] if flags else not gated
    norm = h if gated else 2 * h  # RMSNorm or LayerNorm
    block = _attention(c, h, bias) + _mlp(c, h, gated, bool(c.get("mlp_bias", bias))) + 2 * norm
    positions = 0
    if kind in LEARNED_POSITIONS:
        positions = (_pick(c, "max_position_embeddings", "n_positions") + POSITION_OFFSET.get(kind, 0)) * h
    return vocab * h + positions + layers * block + norm + _head(c, vocab, h), guesses


def _bart_like(c: dict[str, Any]) -> int:
    d, vocab = _pick(c, "d_model"), _pick(c, "vocab_size")
    attention, norm = 4 * (d * d + d), 2 * d
    encoder = _pick(c, "encoder_layers") * (attention + 2 * d * _pick(c, "encoder_ffn_dim") + _pick(c, "encoder_ffn_dim") + d + 2 * norm)
    decoder = _pick(c, "decoder_layers") * (2 * attention + 2 * d * _pick(c, "decoder_ffn_dim") + _pick(c, "decoder_ffn_dim") + d
                                            + 3 * norm)
    kind = str(c.get("model_type"))
    positions = 2 * (_pick(c, "max_position_embeddings") + POSITION_OFFSET.get(kind, 0)) * d if kind in LEARNED_POSITIONS else 0
    return vocab * d + positions + encoder + decoder + 2 * norm + _head(c, vocab, d)  # + an embedding norm each side


def estimate(c: dict[str, Any]) -> SizeEstimate:
    """A generic estimate of the model the (text) config describes, or why there is none."""
    reason = _not_estimable(c)
    if reason is not None:
        return SizeEstimate(None, reason)
    try:
        if c.get("is_encoder_decoder"):
            return SizeEstimate(_bart_like(c), "generic encoder-decoder formula")
        count, guesses = _decoder(c)
    except _Missing as missing:
        return SizeEstimate(None, f"config.json gives no {missing} (left to the class default)")
    return SizeEstimate(count, "generic decoder formula" + (f", guessing {', '.join(guesses)}" if guesses else ""))
