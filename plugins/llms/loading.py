"""Loading an LLM's weights and tokenizer, with errors that say where from and how to fix it.

The source is the options' `model` (a local directory written by save_pretrained, or a hub id) or
the family's default hub id. A local directory is read with `local_files_only`, so a missing file
fails at once instead of being looked up on the hub. The `tiny` variants never come through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlbridge.errors import VLBridgeError, WeightsError
from vlbridge.files.hf_config import load_failure, looks_local

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")
_FIX = ("give options.model a local directory written by save_pretrained (config.json, the weights and the "
        "tokenizer files), or run where the Hugging Face hub is reachable; variant: tiny needs neither")


def source_of(model: str | None, default_hub_id: str) -> str:
    """Where the weights come from: the options' `model`, or the family's default hub id."""
    return model if model else default_hub_id


def _local_kwargs(family: str, source: str) -> dict[str, Any]:
    """`local_files_only` for a directory (after checking it exists); nothing for a hub id."""
    if not looks_local(source):
        return {}
    if not Path(source).expanduser().is_dir():
        raise VLBridgeError(f"{family}: model directory not found: {source}; {_FIX}")
    return {"local_files_only": True}


def load_tokenizer(family: str, source: str, pad_from_eos: bool = False) -> Any:
    """The tokenizer saved with the weights; refuses an empty one (a directory without tokenizer files).
    `pad_from_eos`: a tokenizer without a pad token (Llama's, GPT-2's) pads with its end token, which
    is safe here because padding is always masked."""
    from transformers import AutoTokenizer

    kwargs = _local_kwargs(family, source)
    directory = Path(source).expanduser()
    if kwargs and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise VLBridgeError(f"{family}: {source} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); save the model's "
                            "tokenizer next to its weights with tokenizer.save_pretrained(<dir>)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(Path(source).expanduser()) if kwargs else source, trust_remote_code=False, **kwargs)
    except Exception as exc:  # transformers and tokenizers raise many types for a broken file
        raise load_failure(f"the {family} tokenizer", source, exc, _FIX) from exc
    if pad_from_eos and tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token_id is None or len(tokenizer) < 3:
        raise VLBridgeError(f"{family}: {source!r} has no usable tokenizer (no vocabulary or no pad token); save the "
                            "model's tokenizer next to the weights with tokenizer.save_pretrained(<dir>)")
    return tokenizer


def load_model(family: str, model_class: Any, source: str, dtype: torch.dtype) -> Any:
    """`model_class.from_pretrained(source)` in `dtype`, with load failures turned into VLBridgeError.
    Strict: transformers draws a tensor missing from the files at random and skips one it has no place
    for, which would leave a frozen LLM silently part-random; both are refused by name."""
    kwargs = _local_kwargs(family, source)
    try:
        model, info = model_class.from_pretrained(str(Path(source).expanduser()) if kwargs else source, dtype=dtype,
                                                  output_loading_info=True, trust_remote_code=False, **kwargs)
    except Exception as exc:  # e.g. a SafetensorError for a corrupt weights file
        raise load_failure(f"{model_class.__name__} weights", source, exc, _FIX) from exc
    check_loading_info(info, f"{family}: the {model_class.__name__} weights in {source!r}")
    return model


def check_loading_info(info: dict[str, Any], what: str) -> None:
    """Refuse a from_pretrained that left tensors at their random init or ignored some of the file's
    (transformers already leaves out what a model family declares ignorable, such as old rotary buffers)."""
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    problems = [f"{len(missing)} missing (they would be drawn at random): {_short(missing)}" if missing else "",
                f"{len(unexpected)} unexpected (the model has no place for them): {_short(unexpected)}" if unexpected else ""]
    if any(problems):
        raise WeightsError(f"{what} do not match its config.json: " + "; ".join(p for p in problems if p)
                           + "; give the directory save_pretrained wrote whole, with the config it was saved with")


def _short(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_vocab(family: str, tokenizer: Any, vocab_size: int) -> None:
    """Every token id the tokenizer can emit must have a row in the embedding matrix."""
    if len(tokenizer) > vocab_size:
        raise VLBridgeError(f"{family}: the tokenizer has {len(tokenizer)} tokens but the model embeds only {vocab_size}; "
                            "use the tokenizer saved with these weights, or a model with vocab_size >= the tokenizer's")


def tiny_tokenizer(kind: str) -> Any:
    """The shipped tokenizer of a `tiny` variant (no download)."""
    from transformers import AutoTokenizer

    from vlbridge.plugins.tiny_assets import tokenizer_dir

    return AutoTokenizer.from_pretrained(str(tokenizer_dir(kind)), local_files_only=True)


def load_pretrained(family: str, model_class: Any, model: str | None, variant: str, default_hub_id: str,
                    dtype: torch.dtype, pad_from_eos: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) from `model` (a local dir or hub id) or the default hub id; the vocabulary
    must cover the tokenizer."""
    source = source_of(model, default_hub_id)
    tokenizer = load_tokenizer(family, source, pad_from_eos)
    loaded = load_model(family, model_class, source, dtype)
    check_vocab(family, tokenizer, loaded.get_input_embeddings().num_embeddings)
    return loaded, tokenizer


def image_token_id(family: str, tokenizer: Any, image_token: str | None) -> int | None:
    """The id of the image placeholder, added to the tokenizer as a special token if it lacks it (the
    id may then lie past the embedding table: the placeholder is replaced, never embedded)."""
    if image_token is None:
        return None
    if image_token not in tokenizer.get_vocab():
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    ids = tokenizer(image_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise VLBridgeError(f"{family}: the image token {image_token!r} tokenizes to {len(ids)} tokens {ids}; it must be one "
                            "token (choose another image_token, or null to put the visual tokens first)")
    return ids[0]


def prompting(family: str, tokenizer: Any, opts: Any) -> dict[str, Any]:
    """The wrapper's prompt settings from generic-LLM options (`HFLLMOptions`): the template, chat or
    plain, and the image placeholder's id (added to the tokenizer if needed). Chat needs a template."""
    chat = opts.prompt_format == "chat"
    if chat and not getattr(tokenizer, "chat_template", None):
        raise VLBridgeError(f"{family}: prompt_format 'chat' needs a tokenizer with a chat template, and {opts.model!r}'s has none; "
                            "use prompt_format: plain with a prompt_template (e.g. LLaVA-1.5's 'USER: <image>\\n{} ASSISTANT:')")
    return {"prompt_template": opts.resolved_template, "chat": chat, "image_token_id": image_token_id(family, tokenizer, opts.image_token)}
