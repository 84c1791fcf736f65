"""Export a retrieval model (eva-vit-g + qformer, no LLM: what a transformers Blip2ForImageTextRetrieval
such as Salesforce/blip2-itm-vit-g imports as) back to that class, so the import has a way back.

The class holds the Q-Former's text side, the ITC projections and the ITM head; it has no place for
the ITG head or the ITC temperature (neither is read by retrieval: the ITC scores are plain cosines),
which the export names and the vlbridge checkpoint keeps. The processor is a Blip2Processor with the
Q-Former's BERT tokenizer and no query tokens to insert: the texts go to the Q-Former as typed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from vlbridge.errors import VLBridgeError
from vlbridge.interop.export_fidelity import PROBE_PROMPT, STAGE1_PARTS, max_logit_difference, probe_pixels, settle, warn_left_out
from vlbridge.interop.export_state import load_export_state, require_present
from vlbridge.interop.hf_blip2_config import blip2_config, blip2_differences
from vlbridge.interop.hf_processor import blip_image_processor, write_export

RETRIEVAL_CLASS = "Blip2ForImageTextRetrieval"
NO_PLACE = ("ITG head", "ITC temperature")  # stage-1 parts the class has no tensor for


def export_hf_blip2_retrieval(model: Any, out_dir: str | Path, allow_approximate: bool = False) -> Path:
    """Write an eva-vit-g + qformer model without an LLM as a transformers Blip2ForImageTextRetrieval
    directory (weights, config, Blip2Processor). Exact or refused, as the generation export."""
    from transformers import Blip2ForImageTextRetrieval, Blip2Processor

    from vlbridge.plugins.connectors.qformer_convert import to_transformers
    from vlbridge.plugins.encoders.eva_vit_g_convert import to_hf_blip2_vision_state_dict

    plan, fmt = model.plan, f"transformers {RETRIEVAL_CLASS}"
    if (plan.encoder.name, plan.connector.name) != ("eva-vit-g", "qformer") or getattr(model.connector, "instruction_aware", False):
        raise VLBridgeError(f"a model without an LLM exports as transformers' {RETRIEVAL_CLASS}, which holds eva-vit-g + a "
                            f"(not instruction-aware) qformer; this one is {plan.encoder.name} + {plan.connector.name}")
    require_present(model.connector, lambda ours: bool(to_transformers({ours: None})), f"the {fmt} export")
    state = to_hf_blip2_vision_state_dict(model.encoder.state_dict())
    state.update(to_transformers(model.connector.state_dict()))  # the text side and heads too; ITG head and temp dropped
    warn_left_out(model.connector, fmt, text_side=False, parts=[part for part in STAGE1_PARTS if part[0] in NO_PLACE])
    hf = Blip2ForImageTextRetrieval(blip2_config(model, None)).eval()
    load_export_state(hf, state, None, RETRIEVAL_CLASS)
    settle(f"transformers' {RETRIEVAL_CLASS}", blip2_differences(model.assembly), lambda: _probe_itm_difference(model, hf),
           allow_approximate)
    processor = Blip2Processor(blip_image_processor(plan.preprocess), copy.deepcopy(model.connector.tokenizer))  # it adds <image>
    return write_export(out_dir, hf, processor)


def _probe_itm_difference(model: Any, hf: Any) -> float:
    """Max abs difference of the ITM logits of `model` and its export `hf` on one probe image and text."""
    pixels = probe_pixels(model)
    text = model.connector.tokenizer([PROBE_PROMPT], return_tensors="pt")
    ours = model.connector.itm_logits(text.input_ids.to(model.device), text.attention_mask.to(model.device),
                                      model.encode_images(pixels.to(model.device)))
    theirs = hf(pixel_values=pixels, input_ids=text.input_ids, attention_mask=text.attention_mask, use_image_text_matching_head=True)
    return max_logit_difference(ours, theirs.logits_per_image)
