"""The world's text, and tokenizers fitted to it: what the world's LLMs and BERT are trained on.

Text comes from the "pretrain" stream (images never in a split, no held-out pair): captions, and
questions with answers in BLIP-2's VQA prompt ("Question: {} Short answer: {}"). Tokenizers are
small (a few hundred tokens) and keep each family's special tokens and ids, so the LLM modules
treat them as they treat the real ones (OPT: "\\n" is one token, </s> is prepended; T5: </s> is
appended; BERT: [CLS] text [SEP], the Q-Former adds [DEC]).
"""

from __future__ import annotations

from pathlib import Path

from vlbridge.world.config import WorldConfig
from vlbridge.world.generate import make_image

VQA_PROMPT = "Question: {} Short answer:"  # vlbridge.modeling.model.DEFAULT_VQA_PROMPT, BLIP-2's
TOKENIZER_VOCAB: dict[str, int] = {"opt": 512, "flan-t5": 256, "bert": 255}  # the bert one + [DEC] = 256
_ALPHABET = " ".join("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'\"()-")


def documents(world: WorldConfig, split: str, first: int, count: int) -> list[str]:
    """Captions and prompted question-answer strings of `count` images of a split or stream."""
    docs: list[str] = []
    for index in range(first, first + count):
        image = make_image(world, split, index)
        docs.extend(image.captions)
        docs.extend(f"{VQA_PROMPT.format(qa.question)} {qa.answer}" for qa in image.qas)
    return docs


def captions_of(world: WorldConfig, split: str, first: int, count: int) -> list[str]:
    """Every caption of `count` images of a split or stream."""
    return [c for index in range(first, first + count) for c in make_image(world, split, index).captions]


def qa_pairs(world: WorldConfig, split: str, first: int, count: int) -> list[tuple[str, str]]:
    """(prompted question, answer) pairs, for the encoder-decoder's question answering."""
    return [(VQA_PROMPT.format(qa.question), qa.answer)
            for index in range(first, first + count) for qa in make_image(world, split, index).qas]


def tokenizer_lines(world: WorldConfig) -> list[str]:
    """What the tokenizers are fitted on: pretrain-stream text plus every character once."""
    return documents(world, "pretrain", 20_000_000, 600) + [_ALPHABET]


def _save(tokenizer, out: Path, template: str, specials: dict[str, str]) -> None:
    """Wrap a trained `tokenizers` object for transformers, with its special-token template."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    used = sorted({t for t in specials.values() if t in template})
    tokenizer.post_processor = TemplateProcessing(single=template, pair=f"{template} $B:1",
                                                  special_tokens=[(t, tokenizer.token_to_id(t)) for t in used])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials).save_pretrained(str(out))


def make_tokenizer(kind: str, lines: list[str], out: Path) -> None:
    """Fit the `kind` tokenizer ("opt", "flan-t5" or "bert") on `lines` and save it to `out`."""
    from tokenizers import ByteLevelBPETokenizer

    out.mkdir(parents=True, exist_ok=True)
    size = TOKENIZER_VOCAB[kind]
    if kind == "opt":  # OPT's ids: <s>=0, <pad>=1, </s>=2, <unk>=3; </s> starts every text
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(lines, vocab_size=size, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
        _save(bpe._tokenizer, out, "</s> $A", {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})
    elif kind == "flan-t5":  # T5's ids: <pad>=0, </s>=1, <unk>=2; </s> ends every text; "▁" word starts
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        metaspace = Tokenizer(models.BPE(unk_token="<unk>"))  # BPE: the unigram trainer stalls at ~160 pieces here
        metaspace.pre_tokenizer, metaspace.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        metaspace.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=size, min_frequency=1, special_tokens=["<pad>", "</s>", "<unk>"]))
        _save(metaspace, out, "$A </s>", {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})
    elif kind == "bert":  # uncased WordPiece, [PAD]=0 as the Q-Former's padding_idx expects
        _save(bert_wordpiece(lines, size), out, "[CLS] $A [SEP]",
              {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]"})
    else:
        raise ValueError(f"no world tokenizer {kind!r}")


def bert_wordpiece(lines: list[str], size: int):
    """An uncased WordPiece vocabulary built by rule, not trained: the special tokens, every
    character alone and as "##" continuation, then the most frequent words (ties alphabetical).
    The `tokenizers` WordPiece trainer numbers its pieces in hash order, so its files differ
    from run to run; the world's words are few enough to be whole tokens anyway."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    words = Counter(w for line in lines for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(line)))
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    ranked = [w for w, _ in sorted(words.items(), key=lambda item: (-item[1], item[0])) if w not in vocab]
    vocab += ranked[: max(0, size - len(vocab))]
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder = normalizer, splitter, decoders.WordPiece()
    return tokenizer
