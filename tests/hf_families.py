"""Tiny random transformers LLMs of several families, saved with save_pretrained next to a shipped
tokenizer, for the generic `hf-causal-lm` / `hf-seq2seq` tests. No download: the tokenizers are
vlbridge's tiny ones (their ids fit every config's vocabulary of 1024)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.hf_tiny import redraw
from vlbridge.plugins.tiny_assets import tokenizer_dir

VOCAB = 1024
# A Llama-style chat template (enough for tests: role markers, then the generation prompt).
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}ASSISTANT:{% endif %}")

CAUSAL: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=128),
    "mistral": dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, sliding_window=16),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "gemma": dict(model_type="gemma", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=8, max_position_embeddings=128),
    "opt": dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=32, max_position_embeddings=128),
    "phi": dict(model_type="phi", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128),
}
# Causal LMs whose cache is a recurrent state, wholly (Mamba) or in some layers (LFM2): beam search
# cannot share their prompt's cache, and must still equal transformers' (tests/test_hf_llms.py).
RECURRENT: dict[str, dict[str, Any]] = {
    "mamba": dict(model_type="mamba", hidden_size=32, num_hidden_layers=2, state_size=4),
    "lfm2": dict(model_type="lfm2", hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, full_attn_idxs=[1], max_position_embeddings=128),
}
_BLOCK = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
_BART_LIKE = dict(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                  encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128, forced_bos_token_id=None,
                  forced_eos_token_id=None, scale_embedding=True)
# More families, checked for parity only (forward and generation equal transformers'): what sets each
# apart is in its settings. Sliding windows of 4 are shorter than every test prompt.
PARITY_CAUSAL: dict[str, dict[str, Any]] = {
    "gemma2": dict(model_type="gemma2", **_BLOCK, num_key_value_heads=2, head_dim=8, sliding_window=4,
                   final_logit_softcapping=3.0, attn_logit_softcapping=5.0),
    "mistral-window-4": dict(model_type="mistral", **_BLOCK, num_key_value_heads=2, sliding_window=4),
    "phi3": dict(model_type="phi3", **_BLOCK, num_key_value_heads=2),
    "gpt_neox": dict(model_type="gpt_neox", **_BLOCK),
    "falcon": dict(model_type="falcon", hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    "bloom": dict(model_type="bloom", hidden_size=32, n_layer=2, n_head=4),  # ALiBi
    "starcoder2": dict(model_type="starcoder2", **_BLOCK, num_key_value_heads=2, sliding_window=4),
    "olmo": dict(model_type="olmo", **_BLOCK),
}
PARITY_SEQ2SEQ: dict[str, dict[str, Any]] = {
    "mbart": dict(model_type="mbart", **_BART_LIKE, decoder_start_token_id=1),
    "pegasus": dict(model_type="pegasus", **_BART_LIKE, decoder_start_token_id=0),
    "mt5": dict(model_type="mt5", d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=1, decoder_start_token_id=0),
}
# Families with tests of their own: multi-head latent attention (DeepSeek-V3: keys wider than values in
# the cache), a recurrent state transformers cannot reorder for beams (RWKV), a model whose generate
# refuses inputs_embeds (Bamba), and an encoder that needs input_ids (FSMT).
OTHER_CAUSAL: dict[str, dict[str, Any]] = {
    "deepseek_v3": dict(model_type="deepseek_v3", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                        first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
                        v_head_dim=4, n_group=1, topk_group=1, max_position_embeddings=128),
    "rwkv": dict(model_type="rwkv", hidden_size=32, num_hidden_layers=2, attention_hidden_size=32, intermediate_size=64, context_length=128),
    "bamba": dict(model_type="bamba", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=4, mamba_n_groups=1, mamba_chunk_size=8,
                  max_position_embeddings=128),
}
OTHER_SEQ2SEQ: dict[str, dict[str, Any]] = {
    "fsmt": dict(model_type="fsmt", d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128, src_vocab_size=VOCAB, tgt_vocab_size=VOCAB,
                 langs=["en", "de"], decoder_start_token_id=0),
}
SEQ2SEQ: dict[str, dict[str, Any]] = {
    "t5": dict(model_type="t5", d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=1,
               feed_forward_proj="gated-gelu", decoder_start_token_id=0),
    "bart": dict(model_type="bart", d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                 decoder_start_token_id=1, forced_bos_token_id=None, forced_eos_token_id=None),
}


def _tokenizer(kind: str, chat: bool) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir(kind)), local_files_only=True)
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_llm_dir(directory: Path, family: str, *, chat: bool = False, seed: int = 0, pad: bool = True) -> Any:
    """A tiny random LLM of `family` (a key of CAUSAL, RECURRENT, SEQ2SEQ, PARITY_* or OTHER_*) saved with a tokenizer; returns the model.
    `pad=False` saves a tokenizer without a pad token, as Llama's and GPT-2's are."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    seq2seq = family in {**SEQ2SEQ, **PARITY_SEQ2SEQ, **OTHER_SEQ2SEQ}
    fields = dict(({**SEQ2SEQ, **PARITY_SEQ2SEQ, **OTHER_SEQ2SEQ} if seq2seq else
                   {**CAUSAL, **RECURRENT, **PARITY_CAUSAL, **OTHER_CAUSAL})[family])
    tokenizer = _tokenizer("flan-t5" if seq2seq else "opt", chat)
    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if not seq2seq:
        special["bos_token_id"] = tokenizer.bos_token_id
    config = AutoConfig.for_model(fields.pop("model_type"), vocab_size=VOCAB, **special, **fields)
    torch.manual_seed(seed)
    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_config(config).eval()
    redraw(model, seed=seed)
    model.save_pretrained(directory)
    if not pad:
        tokenizer.pad_token = None
    tokenizer.save_pretrained(directory)
    return model
