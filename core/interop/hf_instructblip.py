"""Import from, and export to, transformers' InstructBLIP (`InstructBlipForConditionalGeneration`
save_pretrained directories such as a local copy of Salesforce/instructblip-vicuna-7b or
instructblip-flan-t5-xl).

InstructBLIP is BLIP-2 with an instruction-aware Q-Former: the instruction, in the Q-Former's own
BERT tokenizer (the `qformer_tokenizer` folder of the processor), joins the queries in
self-attention. Import writes the same checkpoint layout as the BLIP-2 import (encoder weights,
the LLM as its own transformers directory, the Q-Former as the connector with
`instruction_aware: true`); the LLM is `opt` / `flan-t5` where they fit and the generic
`hf-causal-lm` / `hf-seq2seq` otherwise (Vicuna/Llama). Export goes back for eva-vit-g + an
instruction-aware qformer + any of those LLMs.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from vlbridge.files.checkpoint import write_checkpoint
from vlbridge.errors import VLBridgeError, WeightsError
from vlbridge.interop.import_checks import check_imported_assembly
from vlbridge.interop.image_processor_check import check_image_processor
from vlbridge.interop.hf_blip2 import (
    _copy_tokenizer, _write_llm, blip2_preprocess, connector_options, encoder_options, llm_plan, probe_difference,
    require_buildable_language_model, tokenizer_with_image_token, unsupported_settings, write_encoder, zero_qv_biases,
)
from vlbridge.interop.hf_blip2_config import blip2_config, blip2_differences
from vlbridge.interop.export_state import load_export_state, require_present, require_stage2
from vlbridge.interop.export_fidelity import prompt_wording, settle, warn_left_out
from vlbridge.files.hf_config import transformers_config
from vlbridge.interop.hf_processor import blip_image_processor, write_export
from vlbridge.interop.instruction_cut import instruction_tokenizer, processor_instruction_cut, truncating_by_default
from vlbridge.files.weights import read_hf_directory

QFORMER_TOKENIZER = "qformer_tokenizer"  # where InstructBlipProcessor.save_pretrained puts the BERT tokenizer
# What transformers' InstructBLIP has no place for: the Q-Former's stage-1 heads.
STAGE1_HEADS = ("lm_head.*", "vision_proj.*", "text_proj.*", "itm_head.*", "temp")
_NO_PLACE = ("vision_projection.", "text_projection.", "itm_head.")  # their transformers names


def import_hf_instructblip(src_dir: str | Path, out_dir: str | Path, name: str | None = None) -> Path:
    """Convert a transformers InstructBLIP directory into a vlbridge checkpoint directory; returns it."""
    from vlbridge.plugins.connectors.qformer_convert import from_transformers
    from vlbridge.plugins.encoders.eva_vit_g_convert import convert_hf_blip2_vision_state_dict

    src, out = Path(src_dir).expanduser(), Path(out_dir)
    config = transformers_config(src, "instructblip", "InstructBlipForConditionalGeneration")
    unsupported_settings(config, "InstructBLIP")
    check_image_processor(src, blip2_preprocess(config.get("vision_config") or {}), "InstructBLIP")
    tokenizer_src = src / QFORMER_TOKENIZER
    if not (tokenizer_src / "tokenizer_config.json").is_file():
        raise WeightsError(f"{src} has no {QFORMER_TOKENIZER}/ folder (the Q-Former's BERT tokenizer, which reads the "
                           "instruction); save the InstructBlipProcessor into the directory too")
    _check_qformer_vocab(tokenizer_src, config)
    llm = llm_plan(src, config)  # the tokenizer read and the stop token settled before anything is written
    state = read_hf_directory(src)
    out.mkdir(parents=True, exist_ok=True)
    encoder_file = write_encoder(out, zero_qv_biases(config.get("vision_config") or {}, convert_hf_blip2_vision_state_dict(
        {k: v for k, v in state.items() if k.startswith("vision_model.")})))
    tokenizer_dir = out / "qformer-tokenizer"
    if tokenizer_dir.exists():
        shutil.rmtree(tokenizer_dir)
    # the tokenizer re-saved, not the folder copied: a copy would take along whatever else it holds (a link to a secret)
    _copy_tokenizer(tokenizer_src, tokenizer_dir, "the Q-Former (a BERT tokenizer)")
    connector = connector_options(config, str(tokenizer_dir.resolve()))
    connector["instruction_aware"] = True
    # transformers' InstructBlipProcessor cuts the instruction only where its saved tokenizers say so (an export
    # of ours does; LAVIS cuts at 128): elsewhere only the positions limit it
    cut = processor_instruction_cut(src)
    connector["max_instruction_tokens"] = min(cut or connector["max_text_positions"], connector["max_text_positions"])
    assembly = {
        "name": name or src.name,
        "description": f"imported from transformers InstructBlipForConditionalGeneration at {src}",
        "encoder": {"use": "eva-vit-g", "options": encoder_options(config.get("vision_config", {}), str(encoder_file.resolve()))},
        "connector": {"use": "qformer", "options": connector},
        "llm": _write_llm(config, state, out, llm, src),
    }
    check_imported_assembly(assembly, src, "transformers InstructBlipForConditionalGeneration")
    return write_checkpoint(out, assembly, from_transformers(state), 2,
                            {"source": "transformers InstructBlipForConditionalGeneration", "allow_missing": list(STAGE1_HEADS)})


def _check_qformer_vocab(tokenizer_src: Path, config: dict[str, Any]) -> None:
    """Every id the Q-Former's tokenizer writes needs a row of its word embeddings; a larger tokenizer
    imported and then failed only when the model loaded, so it is refused here, before anything is written."""
    from vlbridge.interop.hf_blip2 import _read_tokenizer

    vocab = (config.get("qformer_config") or {}).get("vocab_size", 30522)
    count = len(_read_tokenizer(tokenizer_src, "the Q-Former (a BERT tokenizer)"))
    if count > vocab:
        raise WeightsError(f"{tokenizer_src}: the Q-Former's tokenizer has {count} tokens, but the config's qformer_config.vocab_size "
                           f"is {vocab}, so the Q-Former embeds only ids below {vocab}; save the tokenizer these weights were "
                           "trained with into qformer_tokenizer/")


def export_hf_instructblip(model: Any, out_dir: str | Path, allow_approximate: bool = False) -> Path:
    """Write a built eva-vit-g + instruction-aware qformer + LLM model as a transformers
    InstructBlipForConditionalGeneration directory (weights, config, and the InstructBlipProcessor:
    LLM tokenizer with an `<image>` token, image processor, the Q-Former's tokenizer in
    `qformer_tokenizer/`, saved so that the processor cuts instructions where vlbridge does:
    `vlbridge.interop.instruction_cut`; the prompt wording in `vlbridge_prompt.json` where there is one). A model transformers cannot hold exactly is refused unless
    `allow_approximate`, as for BLIP-2 (the same ln_vision rule)."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor

    from vlbridge.plugins.connectors.qformer_convert import to_transformers
    from vlbridge.plugins.encoders.eva_vit_g_convert import to_hf_blip2_vision_state_dict

    plan = model.plan
    options = model.assembly.connector.options
    require_stage2(model, "transformers' InstructBLIP")
    if (plan.encoder.name, plan.connector.name) != ("eva-vit-g", "qformer") or model.llm is None or not options.instruction_aware:
        raise VLBridgeError("only eva-vit-g + an instruction-aware qformer + an LLM (built for stage 2) map onto transformers' "
                            f"InstructBLIP; this one is {plan.encoder.name} + {plan.connector.name}"
                            f"{'' if getattr(options, 'instruction_aware', False) else ' (not instruction-aware)'} + "
                            f"{plan.llm.name if plan.llm else 'no LLM'}")
    require_buildable_language_model(model, "InstructBLIP")
    tokenizer, image_token_index = tokenizer_with_image_token(model)
    blip2 = blip2_config(model, image_token_index)
    config = InstructBlipConfig(vision_config=blip2.vision_config.to_dict(), qformer_config=blip2.qformer_config.to_dict(),
                                text_config=blip2.text_config.to_dict(), num_query_tokens=blip2.num_query_tokens,
                                image_token_index=image_token_index)
    state = to_hf_blip2_vision_state_dict(model.encoder.state_dict())
    require_present(model.connector, lambda ours: any(not k.startswith(_NO_PLACE) for k in to_transformers({ours: None})),
                    "the transformers InstructBLIP export")
    for key, value in to_transformers(model.connector.state_dict()).items():  # BLIP-2's names -> InstructBLIP's
        if key.startswith(_NO_PLACE):
            continue
        if key.startswith("qformer.layernorm."):
            key = key.replace("qformer.layernorm.", "qformer.embeddings.layernorm.")
        elif key.startswith("embeddings."):
            key = "qformer." + key
        state[key] = value
    warn_left_out(model.connector, "transformers InstructBLIP", text_side=False)  # it reads instructions with it
    llm_model = model.merged_llm_model()  # LoRA merged
    state.update({f"language_model.{k}": v for k, v in llm_model.state_dict().items()})
    hf = InstructBlipForConditionalGeneration(config).eval()
    load_export_state(hf, state, llm_model, "InstructBlipForConditionalGeneration")
    settle("transformers' InstructBLIP", blip2_differences(model.assembly, model.llm), lambda: probe_difference(model, hf, image_token_index),
           allow_approximate)
    truncating_by_default(tokenizer, "transformers InstructBLIP")  # the processor then cuts instructions as vlbridge does
    processor = InstructBlipProcessor(blip_image_processor(model.plan.preprocess), tokenizer, instruction_tokenizer(model.connector),
                                      num_query_tokens=blip2.num_query_tokens)  # writes qformer_tokenizer/ too
    return write_export(out_dir, hf, processor, prompt_wording(model, "transformers InstructBLIP"))
