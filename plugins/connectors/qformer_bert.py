"""The Q-Former's BERT side: its tokenizer (BERT + [DEC]) and initialisation from a BERT checkpoint.

BLIP-2 starts stage 1 from bert-base-uncased: embeddings, self-attention and the text FFN are
copied, the text FFN is copied again into the query FFN, and the cross-attention stays random.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlbridge.files.hf_config import CUSTOM_CODE, custom_code
from vlbridge.files.weights import read_hf_directory, read_tensors, require_path, unwrap_state_dict
from vlbridge.errors import VLBridgeError, WeightsError
from vlbridge.plugins.connectors.qformer import HUB_BERT, QFormerOptions
from vlbridge.plugins.connectors.qformer_convert import from_bert

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEC_TOKEN = "[DEC]"
# What a BERT checkpoint may give the Q-Former; `lm_head.*` only comes with an MLM head.
_FROM_BERT = ("embeddings.*", "layers.*.self_attn.*", "layers.*.ffn_text.*", "lm_head.*")
_VOCAB_ROWS = ("embeddings.word.weight", "lm_head.bias")  # may be shorter: [DEC] is added after BERT


def load_tokenizer(opts: QFormerOptions) -> "PreTrainedTokenizerBase":
    """BERT's tokenizer with [DEC] as bos_token: from opts.tokenizer, opts.bert, the shipped tiny one, or the hub."""
    from transformers import AutoTokenizer

    if opts.tokenizer:
        source = opts.tokenizer
    elif opts.bert:
        source = opts.bert
    elif opts.variant == "tiny":
        from vlbridge.plugins.tiny_assets import tokenizer_dir

        source = str(tokenizer_dir("bert"))
    else:
        source = HUB_BERT
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, truncation_side="right", trust_remote_code=False)
    except (OSError, ValueError) as exc:
        if custom_code(exc):
            raise VLBridgeError(f"cannot load the Q-Former's BERT tokenizer from {source!r}: {CUSTOM_CODE}") from None
        raise VLBridgeError(
            f"cannot load the Q-Former's BERT tokenizer from {source!r} ({exc}). Offline, set "
            f"connector.options.bert to a local BERT directory, or use variant 'tiny'") from exc
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    vocab = opts.size("vocab_size")
    if len(tokenizer) > vocab:
        raise VLBridgeError(f"the Q-Former tokenizer from {source!r} has {len(tokenizer)} tokens with [DEC] but the "
                            f"vocabulary is {vocab}; set connector.options.vocab_size to at least {len(tokenizer)}")
    return tokenizer


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a transformers-format BERT directory (safetensors, sharded or not, or a .bin) or file."""
    path = require_path(path, "BERT weights")
    return read_hf_directory(path) if path.is_dir() else unwrap_state_dict(read_tensors(path), str(path))


def init_from_bert(model: nn.Module, path: str | Path) -> None:
    """Copy a BERT checkpoint into the Q-Former (text FFN also into the query FFN); strict on shapes."""
    theirs = from_bert(read_weights(path))
    outside = sorted(k for k in theirs if not _takes_from_bert(k))
    if outside:
        raise WeightsError(f"BERT checkpoint {path}: tensors the initialisation does not take: {outside[:8]}")
    for key in [k for k in theirs if ".ffn_text." in k]:
        theirs[key.replace(".ffn_text.", ".ffn_query.")] = theirs[key]
    own = dict(model.named_parameters())
    has_lm_head = any(k.startswith("lm_head.") for k in theirs)
    required = {k for k in own if (_takes_from_bert(k) or ".ffn_query." in k) and (has_lm_head or not k.startswith("lm_head."))}
    missing, unexpected = sorted(required - set(theirs)), sorted(set(theirs) - set(own))
    if missing or unexpected:
        raise WeightsError(f"BERT checkpoint {path} does not fit this Q-Former (layer count, names): "
                           f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    with torch.no_grad():
        for key, value in theirs.items():
            _copy_checked(own[key], value, key, path)


def _takes_from_bert(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in _FROM_BERT)


def _copy_checked(param: torch.Tensor, value: torch.Tensor, key: str, source: Any) -> None:
    """Copy with shape checks; vocabulary tensors may be shorter (rows past BERT's stay as initialised)."""
    same = tuple(value.shape) == tuple(param.shape)
    fewer_rows = key in _VOCAB_ROWS and value.shape[1:] == param.shape[1:] and value.shape[0] <= param.shape[0]
    if not (same or fewer_rows):
        raise WeightsError(f"{source}: tensor {key} has shape {tuple(value.shape)} but the Q-Former needs {tuple(param.shape)}")
    param[: value.shape[0]].copy_(value.to(param.dtype))
