"""The transformers BLIP-2 configuration of an eva-vit-g + qformer model, and what transformers' BLIP-2
would change in it: shared by the BLIP-2, InstructBLIP and retrieval exports."""

from __future__ import annotations

from typing import Any

from vlbridge.interop.export_fidelity import prompt_places_visual_tokens
from vlbridge.interop.stop_token import export_text_config


def blip2_config(model, image_token_index: int | None):
    """Blip2Config of an eva-vit-g + qformer model; a model without an LLM (a retrieval one) gets
    the Q-Former's text input and transformers' default text_config, which its class never builds."""
    from transformers import Blip2Config

    enc, con = model.assembly.encoder.options, model.assembly.connector.options
    arch = enc.arch
    vision = {"hidden_size": arch["width"], "intermediate_size": arch["mlp_hidden"], "num_hidden_layers": enc.resolved_blocks,
              "num_attention_heads": arch["heads"], "image_size": enc.resolved_image_size, "patch_size": arch["patch"],
              "layer_norm_eps": enc.layer_norm_eps, "qkv_bias": True}
    qformer = {"hidden_size": con.size("hidden_size"), "num_hidden_layers": con.size("num_layers"),
               "num_attention_heads": con.size("num_heads"), "intermediate_size": con.size("intermediate_size"),
               "cross_attention_frequency": con.cross_attention_freq, "vocab_size": con.size("vocab_size"),
               "max_position_embeddings": con.size("max_text_positions"), "layer_norm_eps": con.layer_norm_eps,
               "encoder_hidden_size": model.plan.encoder_out.width, "use_qformer_text_input": model.llm is None}
    text = export_text_config(model.llm, model.llm.model.config) if model.llm is not None else None
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=con.num_query_tokens,
                       image_text_hidden_size=con.embed_dim, image_token_index=image_token_index)


def blip2_differences(assembly, llm: Any = None) -> list[str]:
    """What transformers' BLIP-2 (and InstructBLIP) would change in an eva-vit-g + qformer assembly
    (and in how its built `llm`, where given, places the visual tokens)."""
    found = []
    con_eps, vision_eps = assembly.connector.options.ln_vision_eps, assembly.encoder.options.layer_norm_eps
    if con_eps != vision_eps:
        found.append(f"its ln_vision epsilon {con_eps:g} becomes {vision_eps:g}, because transformers runs ln_vision (the vision "
                     f"post_layernorm) with the vision layer_norm_eps; set the qformer option ln_vision_eps to {vision_eps:g} to export exactly")
    if llm is not None and prompt_places_visual_tokens(llm):
        found.append(f"its LLM puts the visual tokens where its prompt holds the image token ({llm.format_prompt('{}')!r}), "
                     "but transformers' processor puts the query tokens before the whole text (and a prompt holding the "
                     "image token would give it one too many); give the LLM a prompt_template without the image token "
                     "(prompt_format plain) to export exactly")
    return found
