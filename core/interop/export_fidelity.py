"""How exactly an export reproduces the model it came from.

A transformers format may have no place for one of vlbridge's settings (BLIP-2 runs ln_vision with the
vision tower's LayerNorm epsilon; LLaVA applies no final norm to the tower's features). Each exporter
lists such differences; an export with none is exact and costs nothing more. With some, the exported
model is built in memory and both models run on one probe input, so the refusal (or, with
`allow_approximate`, the warning) states the measured max abs difference of the logits instead of a
guess. Nothing is ever exported approximately without the caller asking for it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from vlbridge.errors import VLBridgeError
from vlbridge.files.userfiles import read_json
from vlbridge.modeling.running import evaluating

PROBE_SEED = 0  # the probe image is drawn from its own generator: the caller's RNG is left alone
PROBE_PROMPT = "a photo of"


class ApproximateExportError(VLBridgeError):
    """An export that would change the model's outputs, refused because approximation was not allowed."""


class ApproximateExportWarning(UserWarning):
    """An export that changes the model's outputs by the stated amount, made because it was allowed."""


class LeftOutOfExportWarning(UserWarning):
    """What the export's format has no place for: trained parts (the vlbridge checkpoint keeps them) or a
    setting (kept in a file of the export that the warning names)."""


# what stage 1 trains besides the queries, by the Q-Former's own tensor names
STAGE1_PARTS = (("ITC projections", ("vision_proj.", "text_proj.")), ("ITM head", ("itm_head.",)),
                ("ITG head", ("lm_head.",)), ("ITC temperature", ("temp",)))


TEXT_SIDE_MARK = "embeddings.word.weight"  # the Q-Former's word embeddings: held only with its text side


def warn_left_out(connector: torch.nn.Module, fmt: str, text_side: bool, parts: Sequence[tuple[str, tuple[str, ...]]] = STAGE1_PARTS) -> None:
    """Say which of stage 1's parts an export of a generation model leaves behind: transformers'
    BLIP-2 / InstructBLIP generation classes hold no retrieval heads (and BLIP-2's no text side), so
    the exported directory cannot retrieve, while the vlbridge checkpoint still can (`text_side`: the
    format drops the Q-Former's text side too; `parts`: the stage-1 parts the format has no place for).
    Tensors the connector never had (absent: e.g. imported from such a directory) are not named."""
    from vlbridge.modeling.connector_protocol import absent_tensors

    absent = absent_tensors(connector)
    held = [key for key in connector.state_dict() if key not in absent]
    parts = (["the Q-Former's text side"] if text_side and TEXT_SIDE_MARK in held else []) + [
        name for name, prefixes in parts if any(key.startswith(prefixes) for key in held)]
    if parts:
        warnings.warn(f"left out of the {fmt} export, which has no place for them: {', '.join(parts)}; the vlbridge "
                      "checkpoint keeps them (for `vlbridge retrieve` and stage-1 training)", LeftOutOfExportWarning, stacklevel=3)


def prompt_places_visual_tokens(llm: Any) -> bool:
    """Whether `llm` words a prompt with its image token in it, so that the visual tokens go there
    (LLaVA's way) rather than before the whole text (BLIP-2's). The two formats each hold only one."""
    token_id = getattr(llm, "image_token_id", None)
    if token_id is None:
        return False
    ids, mask = llm.tokenize([llm.format_prompt("...")])
    return bool(ids[0][mask[0].bool()].eq(token_id).any())


PROMPT_FILE = "vlbridge_prompt.json"  # how vlbridge words prompts, in an export whose processor has no place for it


def prompt_wording(model: Any, fmt: str) -> dict[str, str]:
    """{PROMPT_FILE: its JSON} for a model whose LLM words a prompt otherwise than as typed (a prompt
    template such as 'Question: {} Answer:', or the tokenizer's chat template), with a
    LeftOutOfExportWarning naming the file: transformers' Blip2Processor and InstructBlipProcessor
    hold no prompt field and drop a chat template, so the wording would be lost silently. {} where
    prompts go in as typed."""
    template, chat = getattr(model.llm, "prompt_template", "{}"), bool(getattr(model.llm, "chat", False))
    if template == "{}" and not chat:
        return {}
    worded = f"{template!r}" + (" and then the tokenizer's chat template (one user turn, with the generation prompt)" if chat else "")
    how = f"vlbridge gives the LLM each prompt worded as {worded}; the processor does not, so pass it the text worded so"
    if getattr(model.connector, "instruction_aware", False):
        how += " (the Q-Former reads the prompt as typed: its qformer_input_ids come from the prompt before the wording)"
    warnings.warn(f"left out of the {fmt} processor, which has no place for it: {how}; the wording is in {PROMPT_FILE} "
                  "in the export", LeftOutOfExportWarning, stacklevel=3)
    record = {"prompt_template": template, "chat_template": chat, "how": how}
    return {PROMPT_FILE: json.dumps(record, indent=2) + "\n"}


def exported_prompt_options(src: Path, tokenizer: Any) -> dict[str, str]:
    """The generic LLM plugins' prompt options (prompt_template, prompt_format) from the PROMPT_FILE an
    export of ours left in `src`, so that importing it words prompts as the exported model did; {}
    without one. `tokenizer`: the directory's LLM tokenizer, which a chat wording needs."""
    path = src / PROMPT_FILE
    if not path.is_file():
        return {}
    record = read_json(path, "the exported prompt wording", top=dict)
    template, chat = record.get("prompt_template"), record.get("chat_template")
    if not isinstance(template, str) or not isinstance(chat, bool):
        raise VLBridgeError(f"{path}: expected prompt_template (a string with '{{}}') and chat_template (true or false), as "
                            f"a vlbridge export writes them; got {template!r} and {chat!r}")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise VLBridgeError(f"{path}: the exported model worded prompts with its tokenizer's chat template, and the tokenizer "
                            f"in {src} has none, so the import cannot word them so; save the tokenizer with its chat template")
    return {"prompt_template": template, **({"prompt_format": "chat"} if chat else {})}


def probe_pixels(model) -> torch.Tensor:
    """One normalised-looking random image at the encoder's input size, on CPU."""
    size = model.plan.preprocess.image_size
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(PROBE_SEED))


def eval_logits(model, *args, **kwargs) -> torch.Tensor:
    """`model(...).logits` in eval mode (no dropout: the export is compared as it will run), the
    model's training mode put back afterwards."""
    with evaluating(model):
        return model(*args, **kwargs).logits


def max_logit_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| over the logits both models give (compared on CPU in fp32)."""
    ours, theirs = ours.detach().float().cpu(), theirs.detach().float().cpu()
    if ours.shape != theirs.shape:
        raise VLBridgeError(f"the probe gave logits of shape {tuple(ours.shape)} in vlbridge but {tuple(theirs.shape)} "
                            "in the exported model; this is a bug in the exporter")
    return float((ours - theirs).abs().max())


def settle(fmt: str, differences: Sequence[str], measure: Callable[[], float], allow_approximate: bool) -> float | None:
    """None when the export is exact; else the measured difference, if `allow_approximate` (with an
    ApproximateExportWarning saying what changed), or ApproximateExportError naming the way out."""
    if not differences:
        return None
    with torch.no_grad():
        difference = measure()
    what = (f"{fmt} cannot hold this model exactly: {'; '.join(differences)}. On a probe input the exported model's "
            f"logits differ from vlbridge's by up to {difference:.3g} (max abs)")
    if not allow_approximate:
        raise ApproximateExportError(f"{what}; fix the difference, or pass --allow-approximate (Python: "
                                     "allow_approximate=True) to export anyway")
    warnings.warn(f"{what}; exported anyway (allow_approximate)", ApproximateExportWarning, stacklevel=3)
    return difference
