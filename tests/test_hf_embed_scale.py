"""Models that scale embedded ids outside their embedding module (Pegasus, Marian: the encoder's
`embed_scale`; Falcon-H1: `embedding_multiplier`) get their soft prompt's text embedded as they
embed their own ids: the text part of `[visual; text]` equals the model's own embedding of it."""

from __future__ import annotations

import pytest
import torch

from tests.hf_families import VOCAB, _tokenizer
from vlbridge.plugins.llms.hf_causal_lm import HFCausalLMOptions
from vlbridge.plugins.llms.hf_causal_lm_model import build as build_causal
from vlbridge.plugins.llms.hf_seq2seq import HFSeq2SeqOptions
from vlbridge.plugins.llms.hf_seq2seq_model import build as build_seq2seq

pytestmark = pytest.mark.usefixtures("one_torch_thread")
_BART_LIKE = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                  encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, decoder_start_token_id=1, scale_embedding=True)
CONFIGS = {
    "pegasus": _BART_LIKE, "marian": _BART_LIKE, "bart": _BART_LIKE,  # BART scales inside its embedding module
    "falcon_h1": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=16,
                      embedding_multiplier=5.0, max_position_embeddings=64),
}


def _saved(directory, model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    seq2seq = model_type != "falcon_h1"
    tokenizer = _tokenizer("flan-t5" if seq2seq else "opt", chat=False)
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, **CONFIGS[model_type])
    torch.manual_seed(0)
    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_config(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    opts_class, build = (HFSeq2SeqOptions, build_seq2seq) if seq2seq else (HFCausalLMOptions, build_causal)
    return build(opts_class(model=str(directory)))


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_text_is_embedded_as_the_model_embeds_its_ids(model_type, tmp_path):
    llm = _saved(tmp_path, model_type)
    ids, mask = llm.tokenize(["a red ball on the left"])
    if llm.is_encoder_decoder:
        encoder = llm.model.get_encoder()
        own = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = encoder(inputs_embeds=llm.embed_tokens(ids), attention_mask=mask).last_hidden_state
    else:
        own = llm.model(input_ids=ids, attention_mask=mask).logits
        ours = llm.model(inputs_embeds=llm.embed_tokens(ids), attention_mask=mask).logits
    torch.testing.assert_close(ours, own, atol=1e-5, rtol=1e-5)
    visual = torch.randn(1, 2, llm.embed_width)  # the visual prompt goes in as given, before the text
    embeds, _ = llm.visual_prompt(visual, ids, mask)
    torch.testing.assert_close(embeds, torch.cat([visual, llm.embed_tokens(ids)], dim=1))
