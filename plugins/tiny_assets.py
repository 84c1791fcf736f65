"""The shipped tokenizers of the `tiny` variants, and the script that makes them.

Tiny models have random weights but real tokenizers, built here from a small generated corpus so
that nothing is ever downloaded. Regenerate with `python -m vlbridge.plugins.tiny_assets`; the
output is deterministic and small (tens of KB per tokenizer).
"""

from __future__ import annotations

import itertools
import random
import shutil
from pathlib import Path

TINY_DIR = Path(__file__).resolve().parent / "tiny"
VOCAB_SIZE = 1024  # the trainers' target (the qformer spec's tiny vocab); the small corpus yields fewer tokens
KINDS = ("opt", "flan-t5", "bert")
# len() of each shipped tokenizer, for torch-free specs (tests/test_tiny_generation.py checks the files).
TOKENIZER_LENGTHS = {"opt": 529, "flan-t5": 212, "bert": 265}


def tiny_llm_vocab(kind: str) -> int:
    """A tiny LLM's vocabulary: its tokenizer's ids and one spare row, for the `<image>` token that
    transformers' BLIP-2 and LLaVA embed on export. No more: a random head picks ids uniformly, and
    an id the tokenizer lacks decodes to nothing (1024 rows made most tiny generations empty)."""
    return TOKENIZER_LENGTHS[kind] + 1


_COLOURS = "red green blue yellow purple orange black white gray brown pink cyan".split()
_SHAPES = "circle square triangle star cross ring diamond heart cube ball box cat dog car tree house".split()
_SIZES = "small large big tiny huge little".split()
_PLACES = "left right top bottom middle center corner edge".split()
_TEMPLATES = [
    "a {size} {colour} {shape} on the {place}.",
    "there is a {colour} {shape} next to a {colour2} {shape2}.",
    "a photo of a {shape} in the {place} of the image",
    "Question: what colour is the {shape}? Short answer: {colour}",
    "Question: how many {shape}s are there? Short answer: {count}",
    "Question: is the {shape} {colour}? Answer: yes",
    "two {colour} {shape}s and one {size} {shape2}",
    "The {shape} is to the {place} of the {colour2} {shape2}.",
]


def tokenizer_dir(kind: str) -> Path:
    """Directory of a shipped tiny tokenizer ("opt", "flan-t5" or "bert"), for from_pretrained."""
    if kind not in KINDS:
        raise ValueError(f"no tiny tokenizer {kind!r}; choose one of {KINDS}")
    path = TINY_DIR / kind
    if not path.is_dir():
        raise FileNotFoundError(f"tiny tokenizer files are missing at {path}; regenerate with python -m vlbridge.plugins.tiny_assets")
    return path


def corpus(n: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        template = rng.choice(_TEMPLATES)
        lines.append(template.format(
            size=rng.choice(_SIZES), colour=rng.choice(_COLOURS), colour2=rng.choice(_COLOURS),
            shape=rng.choice(_SHAPES), shape2=rng.choice(_SHAPES), place=rng.choice(_PLACES), count=rng.randint(0, 9),
        ))
    lines.append(" ".join(itertools.chain("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", ".,:;?!'\"()-")))
    return lines


def _save(tokenizer, out: Path, template: str, specials: dict[str, str]) -> None:
    """Wrap a trained `tokenizers` object for transformers, with its special-token template."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tokenizer.post_processor = TemplateProcessing(
        single=template, pair=f"{template} $B:1", special_tokens=[(t, tokenizer.token_to_id(t)) for t in set(specials.values()) if t in template]
    )
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials).save_pretrained(out)


def make_opt(out: Path, lines: list[str]) -> None:
    """Byte-level BPE with OPT's special tokens and ids (<s>=0, <pad>=1, </s>=2, <unk>=3); like OPT's,
    it prepends </s> as BOS and the LLM plugin ends captions with "\n"."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=VOCAB_SIZE, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    _save(bpe._tokenizer, out, "</s> $A", {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})


def make_flan_t5(out: Path, lines: list[str]) -> None:
    """Unigram (SentencePiece-style) with T5's ids: <pad>=0, </s>=1, <unk>=2; appends </s> like T5."""
    from tokenizers import SentencePieceUnigramTokenizer

    unigram = SentencePieceUnigramTokenizer()
    unigram.train_from_iterator(lines, vocab_size=VOCAB_SIZE, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    _save(unigram._tokenizer, out, "$A </s>", {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})


def make_bert(out: Path, lines: list[str]) -> None:
    """Uncased WordPiece with BERT's special tokens ([CLS] text [SEP]); the Q-Former adds [DEC]
    as its BOS token, as in BLIP-2, so the vocabulary is VOCAB_SIZE - 1 here."""
    from tokenizers import BertWordPieceTokenizer

    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(lines, vocab_size=VOCAB_SIZE - 1, min_frequency=1,
                                  special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    _save(wordpiece._tokenizer, out, "[CLS] $A [SEP]",
          {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]"})


def main() -> None:
    lines = corpus()
    for kind, make in (("opt", make_opt), ("flan-t5", make_flan_t5), ("bert", make_bert)):
        out = TINY_DIR / kind
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        make(out, lines)
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"{kind}: {out} ({size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
