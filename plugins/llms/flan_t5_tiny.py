"""The random `tiny` FlanT5, on its own so that both the FlanT5 plugin and the generic seq2seq one
(its tiny default) build it without importing each other.

transformers 5 always ties T5's word embeddings in a freshly built model, so the head is untied by
hand (FlanT5's is untied); see flan_t5_model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlbridge.plugins.llms.flan_t5 import ARCH
from vlbridge.plugins.llms.loading import check_vocab


def tiny_model(tokenizer: Any) -> Any:
    """A random `tiny` FlanT5 from the spec's ARCH numbers: gated-GELU FFN, untied LM head."""
    from transformers import T5Config, T5ForConditionalGeneration

    a = ARCH["tiny"]
    check_vocab("flan-t5", tokenizer, a["vocab"])
    config = T5Config(
        vocab_size=a["vocab"], d_model=a["d_model"], d_ff=a["d_ff"], num_heads=a["heads"], d_kv=a["d_kv"],
        num_layers=a["layers"], num_decoder_layers=a["layers"], feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    model = T5ForConditionalGeneration(config)
    head = torch.empty_like(model.lm_head.weight).normal_(0.0, config.initializer_factor)  # T5's untied-head init
    model.lm_head.weight = nn.Parameter(head)
    model.config.tie_word_embeddings = False  # so tie_weights() and save_pretrained keep it untied
    return model
