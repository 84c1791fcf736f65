"""Reading: a world LLM answers a scene's questions from its captions given as plain text.

Why: BLIP-2's bridge can only help an LLM that uses what stands in front of the question. With the
captions as text in place of the soft visual prompt, the score says how much a perfect bridge could
give; with nothing in front, the blind prior. The demo asks zero-shot as "[visual] Question: {}
Short answer:", so the readers see "[captions] Question: {} Short answer:" in the same form:

- OPT: every caption as the LM saw documents ("</s>" + caption + "\\n"), then "</s>Question: ...";
- FlanT5: the captions and the question joined by spaces in one encoder input (its tokenizer has
  no newline, as FlanT5's folds "\\n" into a space); the answer is the decoder's target.

The readers train on exactly the form they are probed in (every caption, in order): a skill
the probe asks for in a form the training never showed is not what the ceiling should measure.
Used by `train_text` (the reading documents and pairs), `train_parts` (the manifest's numbers) and
`bench/probe_world_llm.py`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import torch

from vlbridge.world.language import QUESTION_KINDS
from vlbridge.world.text_corpus import VQA_PROMPT


def opt_context(tokenizer: Any, captions: Sequence[str]) -> list[int]:
    """Caption ids as OPT reads documents: "</s>" + caption + "\\n" each, in the order given."""
    return [t for c in captions for t in tokenizer(c + "\n")["input_ids"]]


def opt_question(tokenizer: Any, question: str) -> list[int]:
    """"</s>Question: {} Short answer:" ids, as the demo's VQA prompt is tokenized."""
    return tokenizer(VQA_PROMPT.format(question))["input_ids"]


def opt_answer(tokenizer: Any, answer: str) -> list[int]:
    """" {answer}\\n": BLIP-2's OPT stops at the newline."""
    return tokenizer(" " + answer + "\n", add_special_tokens=False)["input_ids"]


def t5_source(captions: Sequence[str], question: str) -> str:
    """FlanT5's encoder text: the captions, then the VQA prompt, joined by spaces."""
    return " ".join([*captions, VQA_PROMPT.format(question)])


# -- measuring --------------------------------------------------------------------------------


@torch.no_grad()
def greedy_answers(model: Any, tokenizer: Any, prompts: list[Any], batch: int = 64, max_new_tokens: int = 4) -> list[str]:
    """Greedy answers to prompts, `batch` at a time: OPT prompts are id lists (left-padded, stop at
    the newline), FlanT5 prompts are strings (right-padded, stop at </s>)."""
    model.eval()
    answers: list[str] = []
    for at in range(0, len(prompts), batch):
        chunk = prompts[at: at + batch]
        if model.config.is_encoder_decoder:
            enc = tokenizer(chunk, padding=True, return_tensors="pt")
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
            answers += [t.strip() for t in tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)]
            continue
        length = max(len(ids) for ids in chunk)
        ids = torch.tensor([[tokenizer.pad_token_id] * (length - len(i)) + i for i in chunk])
        mask = torch.tensor([[0] * (length - len(i)) + [1] * len(i) for i in chunk])
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             eos_token_id=newline, pad_token_id=tokenizer.pad_token_id)
        answers += [t.strip() for t in tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)]
    return answers


def reading_prompts(model: Any, tokenizer: Any, items: list[tuple[Any, Any]], with_context: bool = True) -> list[Any]:
    """The reader's prompt for each (image, question) pair, with the image's captions in front or
    none: id lists for OPT (each image's context tokenized once), strings for FlanT5."""
    if model.config.is_encoder_decoder:
        return [t5_source(image.captions if with_context else [], qa.question) for image, qa in items]
    contexts = {id(image): opt_context(tokenizer, image.captions) if with_context else [] for image, _ in items}
    return [contexts[id(image)] + opt_question(tokenizer, qa.question) for image, qa in items]


def qa_accuracy(model: Any, tokenizer: Any, images: list[Any], with_context: bool, batch: int = 64) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers to every question of `images`, with all their captions
    (in order) in front or none: overall and per question category."""
    items = [(image, qa) for image in images for qa in image.qas]
    answers = greedy_answers(model, tokenizer, reading_prompts(model, tokenizer, items, with_context), batch)
    right: dict[str, list[bool]] = defaultdict(list)
    for (_, qa), answer in zip(items, answers):
        right[qa.category].append(answer == qa.answer)
    scores = {kind: round(sum(right[kind]) / len(right[kind]), 4) for kind in QUESTION_KINDS if right[kind]}
    return {"overall": round(sum(map(sum, right.values())) / max(1, len(items)), 4), **scores, "questions": len(items)}
