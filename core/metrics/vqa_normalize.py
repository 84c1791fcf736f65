"""Answer normalisation for VQAv2 accuracy, written from the rules of the official evaluation
(GT-Vision-Lab/VQA, vqaEval.py) as documented; the quirks that change numbers are kept on purpose.

Punctuation: each of the characters in PUNCT is deleted when the answer has it next to a space, or
has a digit-comma-digit anywhere; otherwise it becomes a space. (The test looks at the answer as
given, not as edited so far.) Then a period not followed by a digit is removed, at most 32 times
(the official code passes re.UNICODE, which is 32, where the replacement count goes).

Digits and articles: lower-case, split on whitespace, number words "none"/"zero".."ten" become
digits, "a", "an", "the" are dropped, and apostrophe-less contractions get their apostrophes back.
"""

from __future__ import annotations

import re

PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_LIMIT = 32
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset(["a", "an", "the"])

# Contractions as they should be spelled. Apostrophe-less spellings are derived from these: with one
# apostrophe, the word without it ("dont"); with several, each spelling missing exactly one of them
# ("couldnt've", "couldn'tve"). This yields the official table's entries.
_CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've
he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've needn't not've
o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's
someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd there'd've
there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's
what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()
# Official-table oddities kept for parity: "somebody'd" maps to "somebodyd" (backwards), and the
# entries spelled with a capital I ("Im", "Ive", ...) never match lower-cased text, so "im" stays.
_ODDITIES = {"somebody'd": "somebodyd"}


def _without_one_apostrophe(word: str) -> list[str]:
    positions = [i for i, char in enumerate(word) if char == "'"]
    return [word[:i] + word[i + 1:] for i in positions]


def _contraction_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for word in _CONTRACTIONS:
        for spelling in _without_one_apostrophe(word):
            table[spelling] = word
    table.update(_ODDITIES)
    return table


CONTRACTIONS = _contraction_table()


def process_punctuation(text: str) -> str:
    out = text
    strip_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for char in PUNCT:
        if strip_all or (char + " ") in text or (" " + char) in text:
            out = out.replace(char, "")
        else:
            out = out.replace(char, " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def clean_whitespace(text: str) -> str:
    """Tabs and newlines become spaces and the ends are stripped, before any other step."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_official(text: str) -> str:
    """Both official steps: punctuation, then digits/articles/contractions."""
    return process_digit_article(process_punctuation(text))


def normalize_simple(text: str) -> str:
    """The "simple" variant: lower-case, strip, collapse runs of whitespace; nothing else."""
    return " ".join(text.lower().split())
