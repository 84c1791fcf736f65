"""Text cleaning as BLIP-2 trained with it (LAVIS's `blip_caption` and `blip_question` processors).

The characters removed are BLIP's set, `. ! " ( ) * # : ; ~`: commas, hyphens, question marks and
apostrophes stay, so that cleaned text matches what released BLIP-2 checkpoints saw in training.
"""

from __future__ import annotations

import re

from vlbridge.data.records import DataError

BLIP_PUNCTUATION = '.!"()*#:;~'
_PUNCTUATION_RE = re.compile("[" + re.escape(BLIP_PUNCTUATION) + "]")


def clean_caption(text: str, max_words: int = 50) -> str:
    """Lowercase, turn BLIP's punctuation into spaces, collapse whitespace, keep the first `max_words` words."""
    _check_max_words(max_words)
    words = _PUNCTUATION_RE.sub(" ", text.lower()).split()
    return " ".join(words[:max_words])


def clean_question(text: str, max_words: int = 50) -> str:
    """Lowercase, delete BLIP's punctuation (a question mark stays), collapse whitespace, cap the words."""
    _check_max_words(max_words)
    words = _PUNCTUATION_RE.sub("", text.lower()).split()
    return " ".join(words[:max_words])


def _check_max_words(max_words: int) -> None:
    if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 1:
        raise DataError(f"max_words must be a positive integer, got {max_words!r}")
