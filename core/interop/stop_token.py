"""Where an imported model stops generating. transformers' BLIP-2, InstructBLIP and LLaVA stop at
their generation config's eos_token_id (generation_config.json, else the text config's); vlbridge's
causal LLM plugins stop at their own end token ('\\n' for opt; for hf-causal-lm the tokenizer's
eos_token and every eos id of its folder's generation config). Where the two differ, the import names
the checkpoint's token as the plugin's `eos_token`, and gives hf-causal-lm's folder the checkpoint's
generation settings (a list of several eos ids included), so captions end where transformers' end; an
export writes the ids the LLM stops at as the text config's eos_token_id, so transformers' model stops
where vlbridge's does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlbridge.errors import VLBridgeError
from vlbridge.files.atomic import atomic_write_text
from vlbridge.files.userfiles import read_json

GENERATION_CONFIG = "generation_config.json"


def _generation_settings(src: Path) -> dict[str, Any] | None:
    path = src / GENERATION_CONFIG
    return read_json(path, "the generation settings", top=dict) if path.is_file() else None


def checkpoint_eos(src: Path, text_config: dict[str, Any]) -> Any:
    """The eos_token_id transformers' model generates with: generation_config.json's, else the text config's."""
    saved = _generation_settings(src)
    if saved is not None and "eos_token_id" in saved:
        return saved["eos_token_id"]
    return text_config.get("eos_token_id")


def carry_generation_config(src: Path, llm_dir: Path) -> None:
    """Give the imported language model's folder the checkpoint's generation_config.json (re-written
    from what parsed, never copied: a hub cache links it to a blob), so hf-causal-lm reads the ids
    transformers' model stops at and pads with; without one, both read the text config's."""
    saved = _generation_settings(src)
    if saved is not None:
        atomic_write_text(llm_dir / GENERATION_CONFIG, json.dumps(saved, indent=2, sort_keys=True) + "\n")


def plugin_end_id(plugin: str, tokenizer: Any) -> int | None:
    """The token a causal LLM plugin ends captions with unless its eos_token option names another."""
    if plugin == "opt":
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        return newline[0] if len(newline) == 1 else None
    return tokenizer.eos_token_id


def stop_token_option(eos: Any, tokenizer: Any, default_id: int | None, where: Path, several: bool = True) -> dict[str, str]:
    """{"eos_token": text} for a causal LLM plugin whose own end token (`default_id`) is not the
    checkpoint's `eos`; {} where they agree. A list of several ids (transformers stops at any) agrees
    where it holds `default_id` (hf-causal-lm stops at all of them, read from its folder), else names
    the first; a plugin that stops at one token alone (`several` False: opt) cannot take one."""
    from vlbridge.plugins.llms.stop_ids import as_id_list

    ids = as_id_list(eos, str(where))
    if len(ids) > 1 and not several:
        raise VLBridgeError(f"{where}: generation stops at any of the eos_token_ids {ids}, and this language model's vlbridge "
                            "plugin (opt, as BLIP-2) stops at one token alone, so it would run past the others; this checkpoint "
                            "cannot be imported exactly")
    if not ids or default_id in ids:
        return {}
    eos = ids[0]
    text = tokenizer.decode([eos])
    if not text or tokenizer(text, add_special_tokens=False)["input_ids"] != [eos]:
        raise VLBridgeError(f"{where}: generation stops at eos_token_id {eos}, which the tokenizer cannot write as a single "
                            f"token (it decodes to {text!r}); vlbridge's LLM would stop elsewhere, so this checkpoint "
                            "cannot be imported exactly")
    return {"eos_token": text}


def export_text_config(llm: Any, config: Any) -> dict[str, Any]:
    """The language model's `config` as a dict whose eos_token_id is what `llm` (a built vlbridge LLM)
    stops at, where it has its own (the causal plugins' stop_token_ids, one id or a list of several;
    a seq2seq LLM stops at its config's)."""
    text = config.to_dict()
    stops = getattr(llm, "stop_token_ids", None)
    if stops:
        text["eos_token_id"] = stops if len(stops) > 1 else stops[0]
    return text
