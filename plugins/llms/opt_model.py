"""OPT (decoder-only) as BLIP-2's frozen LLM: `[visual; text]` in, shifted next-token loss out.

As in BLIP-2, captions end with "\\n" and generation stops at the "\\n" token by default (the
`eos_token` option names another end, as a transformers BLIP-2 whose config stops elsewhere needs). The visual
prompt enters at the input-embedding width, which for OPT-350m (512) is narrower than the hidden
size (1024): OPT's own `project_in` maps both the visual prompt and the text up.
"""

from __future__ import annotations

from typing import Any

from vlbridge.errors import VLBridgeError
from vlbridge.parts.freeze import torch_dtype
from vlbridge.plugins.llms.loading import check_vocab, load_pretrained, tiny_tokenizer
from vlbridge.plugins.llms.opt import ARCH, OPTOptions
from vlbridge.plugins.llms.hf_causal_lm_model import CausalLM, end_token


class OPTLLM(CausalLM):
    """Frozen `OPTForCausalLM` with a soft visual prompt before the text (BLIP-2's layout: no placeholder)."""

    family = "opt"
    train_pad_side = None  # OPT counts positions from the mask: the caller's padding order stays
    folder_stops = False  # BLIP-2 (LAVIS) stops at the end token alone, not at OPT's </s>

    def __init__(self, model: Any, tokenizer: Any, eos_token: str | None = None) -> None:
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        if eos_token is None and len(newline) != 1:
            raise VLBridgeError(f"opt: the tokenizer splits '\\n' into {len(newline)} tokens {newline}; BLIP-2 ends "
                                "captions with a single '\\n' token, so use OPT's own tokenizer")
        suffix, end_id = ("\n", newline[0]) if eos_token is None else end_token("opt", tokenizer, eos_token)
        super().__init__(model, tokenizer, end_token_id=end_id, caption_suffix=suffix)
        self.newline_token_id: int | None = newline[0] if len(newline) == 1 else None
        self.explicit_positions = False  # OPT derives its learned positions from the mask itself


def tiny_config(tokenizer: Any) -> Any:
    """OPTConfig of the `tiny` variant, from the spec's ARCH numbers and the tokenizer's special ids."""
    from transformers import OPTConfig

    a = ARCH["tiny"]
    check_vocab("opt", tokenizer, a["vocab"])
    return OPTConfig(
        vocab_size=a["vocab"], hidden_size=a["hidden"], num_hidden_layers=a["layers"], num_attention_heads=a["heads"],
        ffn_dim=a["ffn"], word_embed_proj_dim=a["embed"], max_position_embeddings=a["positions"],
        do_layer_norm_before=bool(a["pre_norm"]), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def build(opts: OPTOptions) -> OPTLLM:
    """The frozen OPT of the options: `model` dir / hub id, the default hub id, or a random `tiny` one."""
    from transformers import OPTForCausalLM

    dtype = torch_dtype(opts.dtype)
    if opts.model is None and opts.variant == "tiny":
        tokenizer = tiny_tokenizer("opt")
        model = OPTForCausalLM(tiny_config(tokenizer)).to(dtype)
    else:
        model, tokenizer = load_pretrained("opt", OPTForCausalLM, opts.model, opts.variant, f"facebook/opt-{opts.variant}", dtype)
    return OPTLLM(model, tokenizer, opts.eos_token)
