"""VQAv2 accuracy: the leave-one-out formula, the official answer normalisation and its variants,
and per-type aggregation, all worked by hand."""

from __future__ import annotations

import pytest

from vlbridge.errors import VLBridgeError
from vlbridge.metrics import VQAItem, question_accuracy, vqa_accuracy
from vlbridge.metrics.vqa import items_from_mappings, normalize_pair
from vlbridge.metrics.vqa_normalize import CONTRACTIONS, process_digit_article, process_punctuation


@pytest.mark.parametrize("matches, expected", [
    # with m of 10 answers matching, leaving out a matching answer leaves m - 1 matches, any other leaves m:
    (0, 0.0),
    (1, (1 * 0 + 9 * (1 / 3)) / 10),  # 0.3
    (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
    (3, (3 * (2 / 3) + 7 * 1) / 10),  # 0.9
    (4, 1.0),  # every subset of 9 keeps at least 3 matches
    (10, 1.0),
])
def test_leave_one_out_accuracy(matches, expected):
    answers = ["red"] * matches + ["blue"] * (10 - matches)
    assert question_accuracy("red", answers) == pytest.approx(expected, abs=1e-12)


def test_fewer_than_ten_answers_use_the_same_rule():
    # 3 answers, 2 match: leaving out a match leaves 1 (1/3), leaving out the other leaves 2 (2/3) -> (1/3+1/3+2/3)/3
    assert question_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx(4 / 9)
    with pytest.raises(VLBridgeError, match="at least one human answer"):
        question_accuracy("cat", [])


@pytest.mark.parametrize("raw, expected", [
    ("yes!", "yes "),  # "!" not next to a space: becomes a space
    ("hot - dog", "hot  dog"),  # "-" next to a space: deleted
    ("hot-dog", "hot dog"),
    ("t-shirt - jeans", "tshirt  jeans"),  # the test looks at the whole answer: one "- " deletes every "-"
    ("1,000 (approx)", "1000 approx"),  # a digit-comma-digit deletes all punctuation
    ("end.", "end"),  # a period not followed by a digit is removed
    ("3.5", "3.5"),
    ("." * 40, "." * 8),  # only 32 periods are removed (the official code's re.UNICODE count quirk)
])
def test_punctuation_rules(raw, expected):
    assert process_punctuation(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("The Two dogs", "2 dogs"),  # lower-case, number words to digits, articles dropped
    ("none", "0"), ("ten", "10"), ("eleven", "eleven"),
    ("dont know", "don't know"), ("isnt", "isn't"), ("couldnt've", "couldn't've"), ("couldn'tve", "couldn't've"),
    ("im", "im"),  # the official table spells "Im" with a capital I, so it never matches lower-cased text
    ("an apple a day", "apple day"),
])
def test_digit_article_rules(raw, expected):
    assert process_digit_article(raw) == expected


def test_contraction_table_has_the_official_size_and_spellings():
    assert len(CONTRACTIONS) == 114  # the official table's 120 entries less 4 capital-I and 2 identity ("let's") entries
    assert CONTRACTIONS["yall'd've"] == CONTRACTIONS["y'alld've"] == CONTRACTIONS["y'all'dve"] == "y'all'd've"
    assert CONTRACTIONS["twas"] == "'twas" and CONTRACTIONS["somebody'd"] == "somebodyd"  # kept as the table has it
    assert "its" not in CONTRACTIONS and "well" not in CONTRACTIONS  # real words are not rewritten


def test_variants_differ_where_documented():
    ten_yes = ["yes"] * 10
    # official: all ten answers agree -> raw strings compared: "Yes" != "yes"
    assert question_accuracy("Yes", ten_yes, "official") == 0.0
    # lavis: the prediction is always normalised ("yes"); answers raw -> match
    assert question_accuracy("Yes", ten_yes, "lavis") == 1.0
    assert question_accuracy(" YES\t", ten_yes, "simple") == 1.0
    # answers disagree: official normalises both; "two" -> "2" matches 3 answers -> 0.9
    answers = ["2"] * 3 + ["3"] * 7
    assert question_accuracy("Two", answers, "official") == pytest.approx(0.9)
    assert question_accuracy("Two", answers, "simple") == 0.0
    # lavis gives answers punctuation handling only: "the dog" stays "the dog", the prediction becomes "dog"
    assert normalize_pair("the dog", ["the dog", "a cat"], "lavis") == ("dog", ["the dog", "a cat"])
    assert normalize_pair("the dog", ["the dog", "a cat"], "official") == ("dog", ["dog", "cat"])
    with pytest.raises(VLBridgeError, match="unknown VQA answer normalisation"):
        question_accuracy("a", ["a"], "evalai")


def test_vqa_accuracy_per_type():
    items = [
        VQAItem(1, "yes", ["yes"] * 10, "yes/no", "is the"),  # 1.0
        VQAItem(2, "no", ["yes"] * 8 + ["no"] * 2, "yes/no", "is the"),  # 0.6
        VQAItem(3, "2", ["two"] * 3 + ["3"] * 7, "number", "how many"),  # "two" -> "2": 0.9
        VQAItem(4, "red", ["blue"] * 10, "other", "what color is the"),  # 0.0
    ]
    result = vqa_accuracy(items, per_question=True)
    # overall (1.0 + 0.6 + 0.9 + 0.0) / 4 = 0.625 -> 62.5; yes/no (1.0 + 0.6) / 2 = 80.0
    assert result["overall"] == 62.5
    assert result["per_answer_type"] == {"number": 90.0, "other": 0.0, "yes/no": 80.0}
    assert result["per_question_type"] == {"how many": 90.0, "is the": 80.0, "what color is the": 0.0}
    assert result["normalization"] == "official" and result["num_questions"] == 4
    assert result["per_question"] == pytest.approx({1: 1.0, 2: 0.6, 3: 0.9, 4: 0.0})
    # rounding to 2 decimals, as the official tool prints: 1 of 3 questions right -> 33.33
    third = vqa_accuracy([VQAItem(i, "a", ["a" if i == 0 else "b"] * 10) for i in range(3)])
    assert third["overall"] == 33.33 and third["per_answer_type"] == {} and "per_question" not in third


def test_vqa_accuracy_errors():
    with pytest.raises(VLBridgeError, match="appears twice"):
        vqa_accuracy([VQAItem(1, "a", ["a"]), VQAItem(1, "a", ["a"])])
    with pytest.raises(VLBridgeError, match="no questions"):
        vqa_accuracy([])
    with pytest.raises(VLBridgeError, match="1 without a prediction"):
        items_from_mappings({1: "a"}, {1: {"answers": ["a"]}, 2: {"answers": ["b"]}})
    items = items_from_mappings({5: "blue"}, {5: {"answers": ["blue"] * 10, "answer_type": "other"}})
    assert vqa_accuracy(items)["overall"] == 100.0
