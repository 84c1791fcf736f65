"""Caption metrics: hand-worked BLEU, CIDEr-D and ROUGE-L; the tokenizers; and equality with
pycocoevalcap (when installed) on a varied set of images, per image and for the corpus."""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import shutil

import pytest

from vlbridge.errors import VLBridgeError
from vlbridge.metrics import bleu, cider_d, python_ptb_tokenize, rouge_l, score_captions, tokenize_captions
from vlbridge.metrics.tokenize import java_ptb_tokenize, ptb_jar

LN2 = math.log(2)


# -- BLEU ------------------------------------------------------------------------------------------
def test_bleu_hand_worked():
    # candidate (6 words) against two references; best counts per n-gram over the references:
    #   unigrams: the x2, cat, on, mat match; "sat" does not      -> p1 = 5/6
    #   bigrams:  "the cat", "on the", "the mat" of 5             -> p2 = 3/5
    #   trigrams: "on the mat" of 4                               -> p3 = 1/4
    #   4-grams:  none of 3                                       -> p4 = 1e-15 / (3 + 1e-9)
    # closest reference length is 6 = candidate length: no brevity penalty.
    # BLEU-2 = sqrt(5/6 * 3/5) = sqrt(1/2); BLEU-3 = (1/8)^(1/3) = 1/2; BLEU-4 ~ 8e-5, from the smoothing alone.
    corpus, per_image = bleu(["the cat sat on the mat"], [["the cat is on the mat", "there is a cat on the mat"]])
    p = [(5 + 1e-15) / (6 + 1e-9), (3 + 1e-15) / (5 + 1e-9), (1 + 1e-15) / (4 + 1e-9), 1e-15 / (3 + 1e-9)]
    assert corpus[0] == pytest.approx(5 / 6, abs=1e-9)
    assert corpus[1] == pytest.approx(math.sqrt(0.5), abs=1e-9)
    assert corpus[2] == pytest.approx(0.5, abs=1e-9)
    assert corpus[3] == pytest.approx((p[0] * p[1] * p[2] * p[3]) ** 0.25, rel=1e-12)
    assert 7e-5 < corpus[3] < 9e-5
    assert per_image == [corpus]


def test_bleu_brevity_penalty_uses_the_closest_reference():
    # "the cat" (2 words): reference lengths 3 and 6, closest 3 -> BP = exp(1 - 3/2) = exp(-0.5) = 0.60653
    # p1 = p2 = 1; no trigrams: p3 = 1e-15 / 1e-9 = 1e-6, so BLEU-3 = (1e-6)^(1/3) * BP = 0.01 * 0.60653
    corpus, _ = bleu(["the cat"], [["the cat sat", "a cat sat on the mat"]])
    assert corpus[0] == pytest.approx(math.exp(-0.5), rel=1e-8)
    assert corpus[1] == pytest.approx(math.exp(-0.5), rel=1e-8)
    assert corpus[2] == pytest.approx(0.01 * math.exp(-0.5), rel=1e-6)
    # a tie (4 words; references of 3 and 5) goes to the shorter: 4 > 3, no penalty, BLEU-1 = 4/4
    tie, _ = bleu(["a b c d"], [["a b c d e", "a b c"]])
    assert tie[0] == pytest.approx(1.0, abs=1e-9)  # with length 5 it would be exp(1 - 5/4) = 0.7788


def test_bleu_is_corpus_level_not_a_mean():
    # image A matches 2/2 unigrams, image B 0/3: corpus p1 = 2/5 = 0.4 (lengths 2+3 vs 2+3: no penalty),
    # while the mean of per-image BLEU-1 would be (1 + 0) / 2 = 0.5
    corpus, per_image = bleu(["the cat", "a dog runs"], [["the cat"], ["the bird flies"]])
    assert corpus[0] == pytest.approx(0.4, abs=1e-9)
    assert per_image[0][0] == pytest.approx(1.0, abs=1e-9) and per_image[1][0] == pytest.approx(0.0, abs=1e-9)


# -- CIDEr-D ---------------------------------------------------------------------------------------
def test_cider_d_hand_worked_idf():
    # N = 2 images, ln N = ln 2. df: "a" is in both images' references -> weight ln2 - ln2 = 0;
    # every other n-gram has df 1 (or 0: unseen "x") -> weight ln 2.
    # image 2, "a c" vs "a c": unigram cosine (0*0 + ln2*ln2) / (ln2 * ln2) = 1, bigram "a c" 1,
    #   no 3- or 4-grams: 0, 0; equal length: no penalty -> (1 + 1 + 0 + 0) / 4 * 10 = 5.0
    # image 1, "a x" vs "a b": the only shared n-gram is "a", weight 0 -> 0.0
    corpus, per_image = cider_d(["a x", "a c"], [["a b"], ["a c"]])
    assert per_image == pytest.approx([0.0, 5.0], abs=1e-12)
    assert corpus == pytest.approx(2.5, abs=1e-12)


def test_cider_d_length_penalty_and_unseen_ngrams():
    # image 2: "r s" + seven unseen "z" against "r s" (image 1 "p q" vs "p q" only sets N = 2).
    #   unigrams: candidate r, s (ln2 each), z (tf 7: 7 ln2) -> norm ln2 sqrt(51); reference norm ln2 sqrt(2);
    #     dot 2 ln2^2 -> sqrt(2/51)
    #   bigrams: candidate "r s", "s z" (ln2), "z z" (tf 6: 6 ln2) -> norm ln2 sqrt(38); dot ln2^2 -> 1/sqrt(38)
    #   3/4-grams: the reference has none -> 0
    #   length in bigrams 8 vs 1, delta 7 -> exp(-49 / 72)
    corpus, per_image = cider_d(["p q", "r s z z z z z z z"], [["p q"], ["r s"]])
    expected = (math.sqrt(2 / 51) + 1 / math.sqrt(38)) * math.exp(-49 / 72) / 4 * 10
    assert per_image[1] == pytest.approx(expected, rel=1e-12)  # 0.45605
    assert per_image[0] == pytest.approx(5.0, abs=1e-12)
    assert corpus == pytest.approx((5.0 + expected) / 2, rel=1e-12)


def test_cider_d_averages_over_references_and_clips():
    # one image, N = 1: ln N = 0 -> every weight is 0 and the score is 0, whatever the text
    assert cider_d(["a b"], [["a b"]])[0] == 0.0
    # clipping: repeating a matched word cannot raise the score above the exact caption's
    exact = cider_d(["a b", "c d"], [["a b"], ["c d"]])[1][0]
    repeated = cider_d(["a a a b", "c d"], [["a b"], ["c d"]])[1][0]
    assert exact == pytest.approx(5.0) and repeated < exact


# -- ROUGE-L ---------------------------------------------------------------------------------------
def test_rouge_l_hand_worked():
    # "a cat sat" vs "the cat sat down": LCS "cat sat" = 2, P = 2/3, R = 2/4;
    # F = (1 + 1.44) P R / (R + 1.44 P) = 2.44 * (1/3) / (0.5 + 0.96) = 0.8133.. / 1.46 = 0.557078
    score, _ = rouge_l(["a cat sat"], [["the cat sat down"]])
    assert score == pytest.approx(2.44 * (2 / 3) * 0.5 / (0.5 + 1.44 * 2 / 3), rel=1e-12)
    assert score == pytest.approx(0.557078, abs=1e-6)


def test_rouge_l_takes_best_precision_and_best_recall_separately():
    # against reference 1, LCS 6 of the candidate's 6 (P = 1) but 6 of 9 (R = 2/3);
    # against "cat mat", LCS 2: P = 1/3, R = 1. max P = 1 and max R = 1 -> F = 1.0, though no reference is matched
    score, per_image = rouge_l(["the cat sat on the mat"], [["the cat sat on the mat in the sun", "cat mat"]])
    assert score == pytest.approx(1.0) and per_image == [score]
    assert rouge_l(["dog"], [["cat"]])[0] == 0.0


def test_metrics_reject_bad_input():
    with pytest.raises(VLBridgeError, match="2 candidates but 1 reference sets"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(VLBridgeError, match="non-empty list"):
        cider_d(["a"], [[]])
    with pytest.raises(VLBridgeError, match="no images"):
        rouge_l([], [])
    with pytest.raises(VLBridgeError, match="lack a prediction"):
        score_captions({1: "a"}, {1: ["a"], 2: ["b"]}, tokenizer="none", meteor=False)
    with pytest.raises(VLBridgeError, match="unknown tokenizer"):
        tokenize_captions({1: ["a"]}, "nltk")


# -- tokenizers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ('A "cute" cat (white) sits.', "a cute cat -lrb- white -rrb- sits"),  # brackets survive, lower-cased
    ("I can't believe it's not butter; they're gonna win!", "i ca n't believe it 's not butter they 're gon na win"),
    ("The U.S. flag, at 10:30 p.m. -- wow...", "the u.s. flag at 10:30 p.m. wow"),
    ("Two kids' toys & a $5 bill, 50% off", "two kids toys & a $ 5 bill 50 % off"),
    ("A plate w/ food and/or 1,000 drinks", "a plate w / food and/or 1,000 drinks"),
    ("A cat.  Another cat.", "a cat another cat"),
])
def test_python_ptb_tokenizer(raw, expected):
    assert python_ptb_tokenize(raw) == expected


def test_tokenize_captions_names_the_tokenizer():
    out, used = tokenize_captions({7: ["A Dog.", "two  cats"]}, "none")
    assert used == "none" and out == {7: ["A Dog.", "two cats"]}
    out, used = tokenize_captions({7: ["A Dog."]}, "python-ptb-approx")
    assert used == "python-ptb-approx" and out == {7: ["a dog"]}


ORDINARY_CAPTIONS = [
    "A man riding a wave on top of a surfboard.", "Two dogs are playing with a frisbee in the park.",
    "A plate of food with broccoli, rice and chicken.", "A black-and-white photo of a train at the station.",
    "A young boy's birthday cake with candles.", "What's on the table? A pizza.", "There's a dog on the couch.",
    "A person isn't wearing a helmet on a motorcycle.", 'People walking on a sidewalk near a "STOP" sign.',
    "The bird (a pigeon) sits on a ledge.", "A 10-year-old girl's bike leaning on a fence", "A sign that reads: no parking",
    "A view of the U.S. Capitol at 5 p.m. today", "Kids' toys are scattered on the floor...",
    "A man can't reach the shelf; he's too short.", "Cars parked on the side of the road -- next to a park",
    "Two zebras standing next to each other in a field .", "A group of people riding skis down a snow covered slope!",
]

needs_java_ptb = pytest.mark.skipif(ptb_jar() is None or shutil.which("java") is None,
                                    reason="needs pycocoevalcap (pip install 'vlbridge[eval]') and Java")


@needs_java_ptb
def test_java_ptb_matches_pycocoevalcap_and_python_agrees_on_ordinary_captions():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tricky = ORDINARY_CAPTIONS + ["", "a\nb", "He said 'hello' to the dogs' owner.", "e.g. etc. Jan. Dr. no. (x) [y] {z}"]
    theirs = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(tricky)})
    ours = java_ptb_tokenize(tricky)
    assert ours == [theirs[i][0] for i in range(len(tricky))]
    assert [python_ptb_tokenize(c) for c in ORDINARY_CAPTIONS] == ours[:len(ORDINARY_CAPTIONS)]


# -- equality with pycocoevalcap -------------------------------------------------------------------
VOCAB = "a the man woman dog cat on in with of red blue sitting standing next to table street two is".split()


def varied_set(seed: int = 0, images: int = 40) -> tuple[list[str], list[list[str]]]:
    """Tokenised candidates and references: random, edited copies of a reference, and edge cases."""
    rng = random.Random(seed)

    def sentence(lo: int = 1, hi: int = 14) -> str:
        return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(lo, hi)))

    references = [[sentence() for _ in range(rng.randint(1, 6))] for _ in range(images)]
    candidates = []
    for refs in references:
        words = rng.choice(refs).split()
        kind = rng.random()
        if kind < 0.4:  # an edited copy: high n-gram overlap, so BLEU-4 is not ~0
            words = [w if rng.random() < 0.8 else rng.choice(VOCAB) for w in words] + ([rng.choice(VOCAB)] if rng.random() < 0.5 else [])
            candidates.append(" ".join(words))
        else:
            candidates.append(sentence())
    candidates[:6] = ["", "dog", references[2][0], "the the the the", candidates[4], "a"]  # edge cases
    references[5] = ["a", "a", "dog"]  # duplicated and one-word references
    return candidates, references


def test_varied_set_is_varied():
    candidates, references = varied_set()
    corpus, _ = bleu(candidates, references)
    assert corpus[3] > 0.05 and len({len(r) for r in references}) >= 4  # BLEU-4 is exercised


def test_equal_to_pycocoevalcap_bleu_cider_rouge():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    for seed, images in ((0, 40), (1, 25), (2, 7)):
        candidates, references = varied_set(seed, images)
        gts = {i: refs for i, refs in enumerate(references)}
        res = {i: [c] for i, c in enumerate(candidates)}
        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its statistics
            their_bleu, their_bleu_each = Bleu(4).compute_score(gts, res)
        their_cider, their_cider_each = Cider().compute_score(gts, res)
        their_rouge, their_rouge_each = Rouge().compute_score(gts, res)
        our_bleu, our_bleu_each = bleu(candidates, references)
        our_cider, our_cider_each = cider_d(candidates, references)
        our_rouge, our_rouge_each = rouge_l(candidates, references)
        assert our_bleu == pytest.approx(their_bleu, abs=1e-9)
        for n in range(4):
            assert [row[n] for row in our_bleu_each] == pytest.approx(their_bleu_each[n], abs=1e-9)
        assert our_cider == pytest.approx(their_cider, abs=1e-9) and our_cider > 0.1
        assert our_cider_each == pytest.approx(list(their_cider_each), abs=1e-9)
        assert our_rouge == pytest.approx(their_rouge, abs=1e-9)
        assert our_rouge_each == pytest.approx(list(their_rouge_each), abs=1e-9)


@needs_java_ptb
def test_score_captions_equals_pycocoevalcap_pipeline_on_raw_text():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    rng = random.Random(3)
    raw_refs = {100 + i: rng.sample(ORDINARY_CAPTIONS, 3) for i in range(12)}
    raw_preds = {k: rng.choice(refs).upper() if i % 3 else rng.choice(ORDINARY_CAPTIONS) for i, (k, refs) in enumerate(raw_refs.items())}
    ours = score_captions(raw_preds, raw_refs, tokenizer="java-ptb", meteor=False, per_image=True)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in raw_refs.items()})
    res = tokenizer.tokenize({k: [{"caption": c}] for k, c in raw_preds.items()})
    with contextlib.redirect_stdout(io.StringIO()):
        their_bleu, _ = Bleu(4).compute_score(gts, res)
    assert ours["tokenizer"] == "java-ptb" and ours["num_images"] == 12
    assert [ours[f"Bleu_{n}"] for n in range(1, 5)] == pytest.approx(their_bleu, abs=1e-9)
    assert ours["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-9)
    assert ours["ROUGE_L"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-9)
    assert ours["METEOR"] is None and ours["notes"] == ["METEOR not requested"]


@pytest.mark.skipif(not os.environ.get("VLBRIDGE_SLOW_TESTS"), reason="METEOR starts a JVM that loads a paraphrase table "
                    "(~25 s here); set VLBRIDGE_SLOW_TESTS=1")
@needs_java_ptb
def test_meteor_through_pycocoevalcap():
    result = score_captions({1: "a man riding a wave", 2: "two cats"}, {1: ["A man riding a wave."], 2: ["Two dogs."]}, tokenizer="java-ptb")
    assert 0.3 < result["METEOR"] < 1.0 and result["notes"] == []


def test_metrics_import_no_torch():
    import subprocess
    import sys

    script = ("import sys, vlbridge.metrics as m\n"
              "m.score_captions({1: 'a dog'}, {1: ['A dog.']}, tokenizer='python-ptb-approx', meteor=False)\n"
              "m.vqa_accuracy([m.VQAItem(1, 'yes', ['yes'])])\n"
              "print(sorted(x for x in ('torch', 'numpy', 'transformers') if x in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_without_pycocoevalcap_or_java_the_fallbacks_are_named(monkeypatch):
    import importlib

    meteor_module = importlib.import_module("vlbridge.metrics.meteor")  # the package's `meteor` is the function
    tokenize_module = importlib.import_module("vlbridge.metrics.tokenize")

    monkeypatch.setattr(tokenize_module, "ptb_jar", lambda: None)
    assert tokenize_module.resolve_tokenizer("auto") == "python-ptb-approx"
    with pytest.raises(VLBridgeError, match="needs pycocoevalcap"):
        tokenize_module.resolve_tokenizer("java-ptb")
    monkeypatch.setattr(tokenize_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(meteor_module, "java_available", lambda: False)
    result = score_captions({1: "A dog."}, {1: ["A dog.", "A puppy."]})
    assert result["tokenizer"] == "python-ptb-approx" and result["METEOR"] is None
    assert result["notes"] in ([meteor_module.UNAVAILABLE_NO_JAVA], [meteor_module.UNAVAILABLE_NO_PACKAGE])
    # one image: CIDEr-D's IDF is log(1) = 0, so even a perfect caption scores 0; BLEU/ROUGE-L are 1
    assert result["CIDEr"] == 0.0 and result["ROUGE_L"] == pytest.approx(1.0)
