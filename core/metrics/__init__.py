"""vlbridge.metrics: caption, VQA and retrieval metrics, written for vlbridge from the documented
definitions and checked against the reference implementations (pycocoevalcap, the official VQA tool).

- captions: `score_captions` (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D after PTB tokenisation), and the
  single metrics `bleu`, `cider_d`, `rouge_l`, `meteor` on tokenised text; `tokenize_captions`.
- VQA: `vqa_accuracy` over `VQAItem`s, `question_accuracy`, with the normalisation variant named.
- retrieval: `retrieval_recall` (R@1/5/10 both ways and means), `query_ranks`, `recall_at_k`.

Importing this package never imports torch (retrieval uses numpy, loaded on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

from vlbridge.metrics.bleu import bleu
from vlbridge.metrics.captions import METRIC_NAMES, score_captions
from vlbridge.metrics.cider import cider_d
from vlbridge.metrics.meteor import meteor
from vlbridge.metrics.rouge import rouge_l
from vlbridge.metrics.tokenize import TOKENIZERS, python_ptb_tokenize, resolve_tokenizer, tokenize_captions
from vlbridge.metrics.vqa import VARIANTS as VQA_VARIANTS
from vlbridge.metrics.vqa import VQAItem, question_accuracy, vqa_accuracy

_LAZY = {"retrieval_recall": "vlbridge.metrics.retrieval", "query_ranks": "vlbridge.metrics.retrieval",
         "recall_at_k": "vlbridge.metrics.retrieval"}

__all__ = ["METRIC_NAMES", "TOKENIZERS", "VQAItem", "VQA_VARIANTS", "bleu", "cider_d", "meteor", "python_ptb_tokenize",
           "question_accuracy", "resolve_tokenizer", "rouge_l", "score_captions", "tokenize_captions", "vqa_accuracy", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlbridge.metrics' has no attribute {name!r}")
