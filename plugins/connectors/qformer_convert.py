"""Key conversion between vlbridge's Q-Former and foreign checkpoints (pure functions, no torch).

Sources (facts in blip2-implementation-facts.md §6.2-6.3):
- transformers' BLIP-2 (`Blip2ForConditionalGeneration`, `Blip2ForImageTextRetrieval`), both ways;
- LAVIS (`Blip2Qformer`, `Blip2OPT`, `Blip2T5` state dicts), into ours;
- a BERT checkpoint in transformers format, into ours (for the stage-1 initialisation).

Tensors are passed through untouched. Keys that belong to the other parts of a full checkpoint
(the vision tower, the LLM) are skipped; any other key we do not know is a WeightsError, so a
checkpoint of another layout never loads half-way unnoticed.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from vlbridge.errors import WeightsError

StateDict = dict[str, Any]

# Inside one layer, ours <- BERT-style (LAVIS, BERT, transformers): "{attn}" is the name of the
# attention core, "self" in BERT/LAVIS and "attention" in transformers' BLIP-2.
_LAYER_RULES: tuple[tuple[str, str], ...] = (
    ("attention.{attn}.", "self_attn."),
    ("attention.output.dense.", "self_attn.dense."),
    ("attention.output.LayerNorm.", "self_attn.norm."),
    ("crossattention.{attn}.", "cross_attn."),
    ("crossattention.output.dense.", "cross_attn.dense."),
    ("crossattention.output.LayerNorm.", "cross_attn.norm."),
    ("intermediate_query.dense.", "ffn_query.fc1."),
    ("output_query.dense.", "ffn_query.fc2."),
    ("output_query.LayerNorm.", "ffn_query.norm."),
    ("intermediate.dense.", "ffn_text.fc1."),
    ("output.dense.", "ffn_text.fc2."),
    ("output.LayerNorm.", "ffn_text.norm."),
)

_HF_TOP: dict[str, str] = {
    "query_tokens": "query_tokens",
    "vision_model.post_layernorm.": "ln_vision.",
    "language_projection.": "proj.",
    "qformer.layernorm.": "embeddings.norm.",
    "embeddings.word_embeddings.": "embeddings.word.",
    "embeddings.position_embeddings.": "embeddings.position.",
    "vision_projection.": "vision_proj.",
    "text_projection.": "text_proj.",
    "itm_head.": "itm_head.",
    "qformer.embeddings.layernorm.": "embeddings.norm.",  # InstructBLIP's Q-Former embeds its instruction text
    "qformer.embeddings.word_embeddings.": "embeddings.word.",
    "qformer.embeddings.position_embeddings.": "embeddings.position.",
}
_HF_LAYER = re.compile(r"^qformer\.encoder\.layer\.(\d+)\.(.+)$")
_HF_OTHER_PARTS = ("vision_model.", "language_model.")
_HF_BUFFERS = ("embeddings.position_ids", "qformer.embeddings.position_ids")

_LAVIS_TOP: dict[str, str] = {
    "query_tokens": "query_tokens",
    "ln_vision.": "ln_vision.",
    "opt_proj.": "proj.",
    "t5_proj.": "proj.",
    "vision_proj.": "vision_proj.",
    "text_proj.": "text_proj.",
    "itm_head.": "itm_head.",
    "temp": "temp",
    "Qformer.bert.embeddings.word_embeddings.": "embeddings.word.",
    "Qformer.bert.embeddings.position_embeddings.": "embeddings.position.",
    "Qformer.bert.embeddings.LayerNorm.": "embeddings.norm.",
    "Qformer.cls.predictions.transform.dense.": "lm_head.dense.",
    "Qformer.cls.predictions.transform.LayerNorm.": "lm_head.norm.",
    "Qformer.cls.predictions.bias": "lm_head.bias",
}
_LAVIS_LAYER = re.compile(r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(.+)$")
_LAVIS_OTHER_PARTS = ("visual_encoder.", "opt_model.", "t5_model.")
# The decoder weight is tied to the word embeddings and its bias is an alias of predictions.bias.
_LAVIS_SKIP = ("Qformer.bert.embeddings.position_ids", "Qformer.cls.predictions.decoder.")

_BERT_TOP: dict[str, str] = {
    "embeddings.word_embeddings.": "embeddings.word.",
    "embeddings.position_embeddings.": "embeddings.position.",
    "embeddings.LayerNorm.": "embeddings.norm.",
    "cls.predictions.transform.dense.": "lm_head.dense.",
    "cls.predictions.transform.LayerNorm.": "lm_head.norm.",
    "cls.predictions.bias": "lm_head.bias",
}
_BERT_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
# BLIP-2's Q-Former has no token-type embeddings and no pooler; the MLM decoder is tied.
_BERT_SKIP = ("embeddings.token_type_embeddings.", "embeddings.position_ids", "pooler.",
              "cls.predictions.decoder.", "cls.seq_relationship.")


def _layer_key(rest: str, attn: str) -> str | None:
    """Our name for a key inside one layer (`rest` follows 'layer.{i}.'), or None."""
    for theirs, ours in _LAYER_RULES:
        prefix = theirs.format(attn=attn)
        if rest.startswith(prefix):
            return ours + rest[len(prefix):]
    return None


def _top_key(key: str, table: dict[str, str]) -> str | None:
    for theirs, ours in table.items():
        if key == theirs or (theirs.endswith(".") and key.startswith(theirs)):
            return ours + key[len(theirs):]
    return None


def _renamer(layer_re: re.Pattern[str], attn: str, top: dict[str, str]) -> Callable[[str], str | None]:
    """A key -> our key function for one BERT-style layout."""

    def rename(key: str) -> str | None:
        layer = layer_re.match(key)
        if layer:
            rest = _layer_key(layer.group(2), attn)
            return None if rest is None else f"layers.{layer.group(1)}.{rest}"
        return _top_key(key, top)

    return rename


def _convert(state_dict: StateDict, source: str, rename: Callable[[str], str | None], skip: Callable[[str], bool]) -> StateDict:
    """Rename every key; skipped keys are dropped; anything unknown is a WeightsError."""
    out: StateDict = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if skip(key):
            continue
        ours = rename(key)
        if ours is None:
            unknown.append(key)
        elif ours in out:
            raise WeightsError(f"{source} checkpoint: two keys map to Q-Former key {ours!r} (the second is {key!r})")
        else:
            out[ours] = value
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
        raise WeightsError(f"{source} checkpoint: keys that are not part of a BLIP-2 Q-Former: {shown}")
    return out


def from_transformers(state_dict: StateDict) -> StateDict:
    """transformers' Blip2ForConditionalGeneration / Blip2ForImageTextRetrieval keys -> ours."""

    def skip(key: str) -> bool:
        other_part = key.startswith(_HF_OTHER_PARTS) and not key.startswith("vision_model.post_layernorm.")
        return other_part or key in _HF_BUFFERS

    return _convert(state_dict, "transformers BLIP-2", _renamer(_HF_LAYER, "attention", _HF_TOP), skip)


def to_transformers(state_dict: StateDict) -> StateDict:
    """Ours -> transformers' BLIP-2 keys (the retrieval layout when the text side is present).

    `temp` and the ITG head (`lm_head.*`) are dropped: transformers has no place for them.
    """
    inverse_top: dict[str, str] = {}
    for theirs, ours in _HF_TOP.items():  # BLIP-2's names win over InstructBLIP's where both map to ours
        inverse_top.setdefault(ours, theirs)
    out: StateDict = {}
    for key, value in state_dict.items():
        if key == "temp" or key.startswith("lm_head."):
            continue
        layer = re.match(r"^layers\.(\d+)\.(.+)$", key)
        if layer:
            out[f"qformer.encoder.layer.{layer.group(1)}.{_layer_key_to_bert(layer.group(2), 'attention')}"] = value
            continue
        theirs = _top_key(key, inverse_top)
        if theirs is None:
            raise WeightsError(f"Q-Former key {key!r} has no transformers BLIP-2 counterpart")
        out[theirs] = value
    return out


def _layer_key_to_bert(rest: str, attn: str) -> str:
    for theirs, ours in sorted(_LAYER_RULES, key=lambda rule: -len(rule[1])):  # "self_attn.dense." before "self_attn."
        if rest.startswith(ours):
            return theirs.format(attn=attn) + rest[len(ours):]
    raise WeightsError(f"Q-Former layer key {rest!r} has no BERT-style counterpart")


def from_lavis(state_dict: StateDict) -> StateDict:
    """LAVIS BLIP-2 keys (`Qformer.bert.*`, `Qformer.cls.*`, `opt_proj`/`t5_proj`, ...) -> ours."""

    skip = _LAVIS_SKIP + _LAVIS_OTHER_PARTS
    return _convert(state_dict, "LAVIS BLIP-2", _renamer(_LAVIS_LAYER, "self", _LAVIS_TOP), lambda key: key.startswith(skip))


def from_bert(state_dict: StateDict) -> StateDict:
    """A transformers BERT checkpoint (BertModel, BertForMaskedLM, BertLMHeadModel) -> ours.

    Old checkpoints name LayerNorm parameters gamma/beta; they are read as weight/bias.
    """

    def plain(key: str) -> str:
        key = key.removeprefix("bert.")
        return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))

    named = {plain(key): value for key, value in state_dict.items()}
    return _convert(named, "BERT", _renamer(_BERT_LAYER, "self", _BERT_TOP), lambda key: key.startswith(_BERT_SKIP))
