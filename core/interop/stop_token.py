"""Where an imported model stops generating. transformers' BLIP-2, InstructBLIP and LLaVA stop at
their generation config's eos_token_id (generation_config.json, else the text config's); vlbridge's
causal LLM plugins stop at their own end token ('\\n' for opt, the tokenizer's eos_token for
hf-causal-lm). Where the two differ, the import names the checkpoint's token as the plugin's
`eos_token`, so captions end where transformers' end; an export writes the LLM's end token as the
text config's eos_token_id, so transformers' model stops where vlbridge's does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlbridge.errors import VLBridgeError
from vlbridge.files.userfiles import read_json

GENERATION_CONFIG = "generation_config.json"


def checkpoint_eos(src: Path, text_config: dict[str, Any]) -> Any:
    """The eos_token_id transformers' model generates with: generation_config.json's, else the text config's."""
    path = src / GENERATION_CONFIG
    if path.is_file():
        saved = read_json(path, "the generation settings", top=dict)
        if "eos_token_id" in saved:
            return saved["eos_token_id"]
    return text_config.get("eos_token_id")


def plugin_end_id(plugin: str, tokenizer: Any) -> int | None:
    """The token a causal LLM plugin ends captions with unless its eos_token option names another."""
    if plugin == "opt":
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        return newline[0] if len(newline) == 1 else None
    return tokenizer.eos_token_id


def stop_token_option(eos: Any, tokenizer: Any, default_id: int | None, where: Path) -> dict[str, str]:
    """{"eos_token": text} for a causal LLM plugin whose own end token (`default_id`) is not the
    checkpoint's `eos`; {} where they agree. A list of several ids (transformers stops at any) is
    left as it is: the plugins stop at one token."""
    if isinstance(eos, list) and len(eos) == 1:
        eos = eos[0]
    if not isinstance(eos, int) or isinstance(eos, bool) or eos == default_id:
        return {}
    text = tokenizer.decode([eos])
    if not text or tokenizer(text, add_special_tokens=False)["input_ids"] != [eos]:
        raise VLBridgeError(f"{where}: generation stops at eos_token_id {eos}, which the tokenizer cannot write as a single "
                            f"token (it decodes to {text!r}); vlbridge's LLM would stop elsewhere, so this checkpoint "
                            "cannot be imported exactly")
    return {"eos_token": text}


def export_text_config(llm: Any, config: Any) -> dict[str, Any]:
    """The language model's `config` as a dict whose eos_token_id is the token `llm` (a built vlbridge LLM)
    stops at, where it has its own (the causal plugins' end_token_id; a seq2seq LLM stops at its config's)."""
    text = config.to_dict()
    end = getattr(llm, "end_token_id", None)
    if end is not None:
        text["eos_token_id"] = end
    return text
