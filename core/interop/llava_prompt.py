"""The prompt template an imported LLaVA is worded by: its processor's chat template, rendered once.

A LLaVA directory's processor carries the conversation format the model was tuned on
(`chat_template.jinja`, `chat_template.json` or processor_config.json's `chat_template`): LLaVA-1.5's
renders "USER: <image>\\n... ASSISTANT:", llava-interleave-qwen's ChatML. Importing every LLaVA with
LLaVA-1.5's wording prompted the others in a format they never saw, silently. One user turn (an image,
then the text) is rendered with a sentinel for the text, which becomes the template's '{}'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlbridge.errors import VLBridgeError
from vlbridge.files.userfiles import read_json, read_text

_SENTINEL = "VLBRIDGE_PROMPT_SLOT"


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
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _SENTINEL}]}]
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
