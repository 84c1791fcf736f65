"""LLaVA's chat templates and vlbridge's prompt templates, each way.

Import: a LLaVA directory's processor carries the conversation format the model was tuned on
(`chat_template.jinja`, `chat_template.json` or processor_config.json's `chat_template`): LLaVA-1.5's
renders "USER: <image>\\n... ASSISTANT:", llava-interleave-qwen's ChatML. Importing every LLaVA with
LLaVA-1.5's wording prompted the others in a format they never saw, silently. One user turn (an image,
then the text) is rendered with a sentinel for the text, which becomes the template's '{}'.

Export: the processor written next to the model carries a chat template that words one image and one
text as vlbridge does, so `processor.apply_chat_template(...)` gives vlbridge's prompt: the template the
model was imported with (its tokenizer keeps it), or else one made from vlbridge's prompt template.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from vlbridge.errors import VLBridgeError
from vlbridge.files.userfiles import read_json, read_text

_SENTINEL = "VLBRIDGE_PROMPT_SLOT"


def _one_turn(text: str) -> list[dict[str, Any]]:
    """One user turn as LLaVA's processors take it: an image, then the text."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def processor_chat_template(src: Path) -> str | None:
    """The LLaVA processor's chat template saved in `src`, or None when it has none. A file that
    holds it but cannot be read is an error: passing over it would word prompts as LLaVA-1.5, silently."""
    jinja = src / "chat_template.jinja"
    if jinja.is_file():
        return read_text(jinja, "the processor's chat template", "Jinja")
    for name in ("chat_template.json", "processor_config.json"):
        path = src / name
        if path.is_file():
            found = read_json(path, "the processor's settings", top=dict).get("chat_template")
            if isinstance(found, str) and found.strip():
                return found
    return None


def chat_prompt_template(template: str, tokenizer: Any, image_token: str, src: Path) -> str:
    """`template` rendered for one user turn (image, then text) as a vlbridge prompt template: '{}' where
    the text goes, braces doubled, and the leading BOS left out where the tokenizer adds one itself."""
    turn = _one_turn(_SENTINEL)
    fix = "give --prompt-template (prompt_template=) with '{}' for the prompt and '<image>' for the visual tokens"
    try:
        text = tokenizer.apply_chat_template(turn, chat_template=template, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja raises many types for a template it cannot render
        raise VLBridgeError(f"{src}: the processor's chat template cannot render one image and one text ({exc}); {fix}") from None
    if not isinstance(text, str) or text.count(_SENTINEL) != 1 or text.count(image_token) != 1:
        raise VLBridgeError(f"{src}: the processor's chat template renders one image and one text as {text!r}, not with one "
                            f"{image_token!r} and the text once; {fix}")
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]  # the tokenizer adds it, as transformers' processor does when it tokenizes the text
    return text.replace("{", "{{").replace("}", "}}").replace(_SENTINEL, "{}")


def export_chat_template(llm: Any) -> str:
    """The chat template an exported LLaVA's processor carries: the language model's own (the one an
    imported LLaVA came with) where it words one image and one text as `llm` does, else one made from
    `llm`'s prompt; a LeftOutOfExportWarning says when the model's own is not the one shipped."""
    from vlbridge.interop.export_fidelity import LeftOutOfExportWarning

    own = getattr(llm.tokenizer, "chat_template", None)
    if isinstance(own, str) and _words_as_vlbridge(own, llm):
        return own
    made = prompt_chat_template(llm.format_prompt(_SENTINEL))
    if not _words_as_vlbridge(made, llm):  # a chat-format prompt without BOS where the processor would add one
        raise VLBridgeError(f"no chat template can word prompts as this model does ({llm.format_prompt('...')!r}, "
                            "tokenized without the tokenizer's special tokens); use a plain prompt_template to export it")
    if own:
        warnings.warn("left out of the LLaVA export: the language model's chat template, which words one image and one text "
                      f"otherwise than this model's prompts ({llm.format_prompt('...')!r}); the processor's chat template "
                      "words them as vlbridge does, for one user turn", LeftOutOfExportWarning, stacklevel=3)
    return made


def prompt_chat_template(prompt: str) -> str:
    """A chat template that renders one user turn (at most one image, then text) as `prompt` with the
    turn's text in place of the sentinel: vlbridge's prompt template, which has no place for a system
    message, more turns or more images, so those are errors rather than dropped."""
    if prompt.count(_SENTINEL) != 1:
        raise VLBridgeError(f"the prompt {prompt!r} does not hold the text once, so no chat template can word it")
    before, after = prompt.split(_SENTINEL)
    refuse = ("{{- raise_exception(" + json.dumps("this chat template words prompts as the vlbridge model it was exported with: give "
                                                  "one user message with at most one image and its text (no system message, "
                                                  "no earlier turns)", ensure_ascii=False)
              + ") -}}")
    return ("{%- if messages | length != 1 or messages[0]['role'] != 'user' -%}" + refuse + "{%- endif -%}"
            "{%- set content = messages[0]['content'] -%}"
            "{%- if content is string -%}{%- set text = content -%}{%- else -%}"
            "{%- if content | selectattr('type', 'equalto', 'image') | list | length > 1 -%}" + refuse + "{%- endif -%}"
            "{%- set text = content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
            "{%- endif -%}"
            "{{- " + json.dumps(before, ensure_ascii=False) + " + text + " + json.dumps(after, ensure_ascii=False) + " -}}")


def _words_as_vlbridge(template: str, llm: Any) -> bool:
    """Whether LlavaProcessor, given `template`, tokenizes one image and one text as `llm` does (it adds
    the tokenizer's special tokens unless the rendered text starts with BOS)."""
    tokenizer = llm.tokenizer
    try:
        text = tokenizer.apply_chat_template(_one_turn(_SENTINEL), chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # jinja raises many types for a template it cannot render
        return False
    if not isinstance(text, str):
        return False
    bos = tokenizer.bos_token
    theirs = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
    ids, mask = llm.tokenize([llm.format_prompt(_SENTINEL)])
    return theirs == ids[0][mask[0].bool()].tolist()
