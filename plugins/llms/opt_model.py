"""OPT (decoder-only) as BLIP-2's frozen LLM: `[visual; text]` in, shifted next-token loss out.

As in BLIP-2, captions end with "\\n" and generation stops at the "\\n" token by default. The visual
prompt enters at the input-embedding width, which for OPT-350m (512) is narrower than the hidden
size (1024): OPT's own `project_in` maps both the visual prompt and the text up.
"""

from __future__ import annotations

from typing import Any

import torch

from vlbridge.errors import VLBridgeError
from vlbridge.freeze import torch_dtype
from vlbridge.plugins.llms.loading import check_vocab, load_pretrained, tiny_tokenizer
from vlbridge.plugins.llms.opt import ARCH, OPTOptions
from vlbridge.plugins.llms.soft_prompt import IGNORE_INDEX, SoftPromptLLM, ignore_padding


class OPTLLM(SoftPromptLLM):
    """Frozen `OPTForCausalLM` with a soft visual prompt before the text."""

    caption_suffix = "\n"
    is_encoder_decoder = False
    family = "opt"
    generate_pad_side = "left"

    def __init__(self, model: Any, tokenizer: Any) -> None:
        super().__init__(model, tokenizer)
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        if len(newline) != 1:
            raise VLBridgeError(f"opt: the tokenizer splits '\\n' into {len(newline)} tokens {newline}; BLIP-2 ends "
                                "captions with a single '\\n' token, so use OPT's own tokenizer")
        self.newline_token_id: int = newline[0]

    def forward(self, visual_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None) -> Any:
        """Logits over `[visual; text]`, and with `labels` (aligned with `input_ids`) the mean shifted CE.

        Labels at padded positions (attention_mask 0) are set to -100 here; the caller sets -100 on any
        prompt it does not want to train on. The visual positions never count.
        """
        if decoder_attention_mask is not None:
            raise VLBridgeError("opt is decoder-only: it has no decoder_attention_mask; pass the text mask as attention_mask")
        embeds, mask = self.visual_prompt(visual_embeds, input_ids, attention_mask)
        if labels is not None:
            labels = ignore_padding(labels.to(self.device), attention_mask.to(self.device))
            prefix = labels.new_full((labels.shape[0], visual_embeds.shape[1]), IGNORE_INDEX)
            labels = torch.cat([prefix, labels], dim=1)
        return self.model(inputs_embeds=embeds, attention_mask=mask, labels=labels)

    def generation_defaults(self) -> dict[str, Any]:
        """BLIP-2 stops OPT at the end of a line: "\\n" is the end token unless the caller gives one."""
        return {**super().generation_defaults(), "eos_token_id": self.newline_token_id}


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
    return OPTLLM(model, tokenizer)
