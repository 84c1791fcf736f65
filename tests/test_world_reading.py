"""OPT's reading documents and their loss in both styles (vlbridge.world.train_text.READING_STYLES):
the answer tokens are marked exactly, the captions come in the style's orders, and each loss weighs
the tokens as documented."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer

from vlbridge.world import WorldConfig
from vlbridge.world.assets import part_dir
from vlbridge.world.generate import make_image
from vlbridge.world.reading import opt_answer, opt_context
from vlbridge.world.train_text import ANSWER_WEIGHT, LM_SHARE, READING_STYLES, reading_document, reading_loss


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(part_dir("opt")))


@pytest.mark.parametrize("style", sorted(READING_STYLES))
def test_documents_mark_exactly_the_answers_and_follow_the_style(tokenizer, style):
    world = WorldConfig().model_copy(update={"questions_per_image": 10})
    rng = random.Random(0)
    form = READING_STYLES[style]
    blind = shuffled = 0
    for i in range(200):
        image = make_image(world, "pretrain", 40_000_000 + i)
        ids, answers = reading_document(tokenizer, image, rng, style)
        assert len(ids) == len(answers)
        marked = [t for t, a in zip(ids, answers) if a]
        answered = [qa for qa in image.qas if tokenizer.decode(marked).find(qa.answer) >= 0]
        assert marked and answered  # the marked tokens spell answers of this image
        text = tokenizer.decode(ids)
        in_order = opt_context(tokenizer, image.captions)
        scene_first = opt_context(tokenizer, image.captions[:1])
        if ids[: len(in_order)] == in_order:
            pass
        elif ids[: len(scene_first)] == scene_first:  # the scene caption, then the rest in another order
            shuffled += 1
        else:  # no captions: the document opens with its first question
            assert text.startswith("</s>Question:") and text.split("Question:")[0] == "</s>", text
            blind += 1
        count = text.count("Question:")
        assert 1 <= count <= form["questions"]
        for qa in image.qas:  # every answered question's answer tokens sit right after its prompt
            if f"Question: {qa.question} Short answer:" in text:
                assert all(t in ids for t in opt_answer(tokenizer, qa.answer))
    assert 0.5 * form["blind"] * 200 <= blind <= 2 * form["blind"] * 200 + 2
    assert (shuffled > 20) == (form["shuffle"] > 0)


def test_losses_weigh_the_tokens_as_documented():
    class Fixed(torch.nn.Module):  # logits that give token-wise losses we can compute by hand
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": self.logits})()

    torch.manual_seed(0)
    ids = torch.tensor([[1, 2, 3, 4, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    answers = torch.tensor([[False, False, False, True, False]])
    logits = torch.randn(1, 5, 8)
    model = Fixed(logits)
    token = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")  # predicts ids 2, 3, 4, 0
    batch = {"input_ids": ids, "attention_mask": mask, "answers": answers}
    lm = (token[0] + token[1] + ANSWER_WEIGHT * token[2]) / (2 + ANSWER_WEIGHT)  # the pad target (mask 0) is left out
    assert reading_loss(model, batch, "lm").item() == pytest.approx(lm.item(), rel=1e-5)
    answers_style = token[2] + LM_SHARE * (token[0] + token[1]) / 2
    assert reading_loss(model, batch, "answers").item() == pytest.approx(answers_style.item(), rel=1e-5)
