"""The world's text models, trained on its text only (no images), as the real ones were on theirs:

- OPT: next-token prediction on packed blocks of documents (every position of its context trains);
- FlanT5: question answering in BLIP-2's prompt and prefix-LM on captions (the encoder-decoder's
  tasks in BLIP-2), some inputs led by unrelated documents so that long relative distances train;
- BERT: masked-LM (15%: 80% [MASK], 10% random, 10% kept), the Q-Former's initialisation. Its
  token-type embedding stays zero and frozen: the Q-Former has none, so nothing is lost in the copy.

Sizes come from `vlbridge.world.architectures`; each part is saved as a transformers directory that
says its own architecture, so the model plugins load it as any local model.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from vlbridge.world import architectures
from vlbridge.world.text_corpus import VQA_PROMPT

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TextRecipe:
    """Steps of `batch` sequences, AdamW with linear warmup then cosine decay."""

    steps: int = 150
    batch: int = 16
    lr: float = 3e-3
    warmup: int = 15
    weight_decay: float = 0.01
    reading: Literal["lm", "answers"] = "lm"  # OPT's reading documents: READING_STYLES


def model_loss(model: Any, batch: Batch) -> torch.Tensor:
    """The model's own loss on the batch (mean cross-entropy over its labels)."""
    return model(**batch).loss


def fit(model: Any, make_batch: Callable[[int], Batch], recipe: TextRecipe, name: str, log: Callable[[str], None],
        loss_of: Callable[[Any, Batch], torch.Tensor] = model_loss, monitor: Callable[[], Any] | None = None,
        every: int = 0) -> tuple[float, dict[int, Any]]:
    """Train `model` on `make_batch(step)` for the recipe's steps; return the final loss and what
    `monitor()` said every `every` steps and at the end (how a skill grows with the steps)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    model.train()
    start, loss, seen = time.perf_counter(), torch.tensor(float("nan")), {}
    for step in range(recipe.steps):
        progress = max(0, step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        scale = (step + 1) / recipe.warmup if step < recipe.warmup else 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * scale
        loss = loss_of(model, make_batch(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 50 == 0 or step == recipe.steps - 1:
            log(f"{name} step {step}/{recipe.steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
        if monitor is not None and ((every and (step + 1) % every == 0) or step == recipe.steps - 1):
            seen[step + 1] = monitor()
            log(f"{name} after {step + 1} steps: {seen[step + 1]}")
            model.train()
    model.eval()
    return float(loss.item()), seen


@torch.no_grad()
def perplexity(model: Any, batches: list[Batch]) -> float:
    """exp of the mean cross-entropy per labelled token over the batches."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        tokens = int((batch["labels"] != -100).sum())
        total += float(model(**batch).loss) * tokens
        count += tokens
    return round(math.exp(total / count), 3)


# -- OPT ----------------------------------------------------------------------------------------


READING_START = 40_000_000  # pretrain-stream images the reading documents draw from
# Two ways to write and weigh OPT's reading documents, both measured (docs/demo-findings.md section 6):
# - "lm": a language model first. Every token is LM loss, the answers' tokens weigh ANSWER_WEIGHT;
#   the captions come in order or with the scene caption first and the rest shuffled, none for 10%
#   of documents; 1-3 questions. Reads captions given as text less well (66%), but answers far
#   better when a trained soft prompt stands in for them: the demo's zero-shot protocol (shipped).
# - "answers": a reader first. The loss is the mean over the answer tokens plus LM_SHARE times the
#   mean over the rest; every caption in order, none for 5%; 1-5 questions. Reads text captions
#   better (79%), but through a soft prompt answers below the blind prior.
READING_STYLES = {"lm": {"blind": 0.10, "questions": 3, "shuffle": 0.5},
                  "answers": {"blind": 0.05, "questions": 5, "shuffle": 0.0}}
ANSWER_WEIGHT = 4.0  # "lm": an answer token's weight in the LM loss
LM_SHARE = 0.5  # "answers": the caption-and-question language loss's weight against the answers' loss (1)


def _check_style(style: str) -> None:
    if style not in READING_STYLES:
        raise ValueError(f"unknown reading style {style!r}; choose from {sorted(READING_STYLES)}")


def reading_document(tokenizer: Any, image: Any, rng: random.Random, style: str = "lm") -> tuple[list[int], list[bool]]:
    """One OPT sequence in a READING_STYLES style: the image's captions (none for a blind share;
    in order, or the scene caption first and the rest shuffled), then some of its questions, each
    answered; the mask marks the answer tokens."""
    from vlbridge.world.reading import opt_answer, opt_context, opt_question

    form = READING_STYLES[style]
    captions = [] if rng.random() < form["blind"] else list(image.captions)
    if captions and rng.random() < form["shuffle"]:
        rest = captions[1:]
        rng.shuffle(rest)
        captions = captions[:1] + rest
    ids = opt_context(tokenizer, captions)
    answers = [False] * len(ids)
    for qa in rng.sample(image.qas, rng.randint(1, form["questions"])):
        question, answer = opt_question(tokenizer, qa.question), opt_answer(tokenizer, qa.answer)
        ids += question + answer
        answers += [False] * len(question) + [True] * len(answer)
    return ids, answers


def reading_batches(tokenizer: Any, world: Any, batch: int, style: str = "lm") -> Callable[[int], Batch]:
    """`fit`'s batch `step`: reading documents of pretrain-stream images (10 questions each to
    choose from), right-padded; "answers" marks the answer tokens."""
    from vlbridge.world.generate import make_image

    _check_style(style)
    world = world.model_copy(update={"questions_per_image": 10})
    rng = random.Random(0)  # steps are asked for in order, so the draws follow the step number

    def make(step: int) -> Batch:
        samples = [reading_document(tokenizer, make_image(world, "pretrain", READING_START + step * batch + j), rng, style)
                   for j in range(batch)]
        length = max(len(ids) for ids, _ in samples)
        return {"input_ids": torch.tensor([i + [tokenizer.pad_token_id] * (length - len(i)) for i, _ in samples]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i, _ in samples]),
                "answers": torch.tensor([a + [False] * (length - len(a)) for _, a in samples])}

    return make


def reading_loss(model: Any, batch: Batch, style: str = "lm") -> torch.Tensor:
    """Next-token cross-entropy over the real tokens. "lm": one weighted mean, answer tokens
    weighing ANSWER_WEIGHT. "answers": the mean on the answer tokens plus LM_SHARE times the mean on
    the rest (answers are a few tokens among a hundred, and would drown in one mean)."""
    _check_style(style)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["input_ids"][:, 1:].flatten(), reduction="none")
    answers, real = batch["answers"][:, 1:].flatten(), batch["attention_mask"][:, 1:].flatten().bool()
    if style == "answers":
        return loss[answers].mean() + LM_SHARE * loss[real & ~answers].mean()
    weights = real.float() + (ANSWER_WEIGHT - 1.0) * answers.float()
    return (loss * weights).sum() / weights.sum()


def build_opt(tokenizer: Any) -> Any:
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        **architectures.OPT, do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return OPTForCausalLM(config)


def padded_lm_batches(tokenizer: Any, docs: list[str], size: int = 64) -> list[Batch]:
    """Unpacked documents, padded: what perplexity is measured on (padding is not scored)."""
    out = []
    for at in range(0, len(docs), size):
        enc = tokenizer([d + "\n" for d in docs[at: at + size]], padding=True, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out


# -- FlanT5 -------------------------------------------------------------------------------------


def build_t5(tokenizer: Any) -> Any:
    """Gated-GELU T5 with an untied head (transformers 5 ties T5 by default; see flan_t5_model)."""
    from torch import nn
    from transformers import T5Config, T5ForConditionalGeneration

    a = architectures.T5
    config = T5Config(
        **a, num_decoder_layers=a["num_layers"], feed_forward_proj="gated-gelu", dropout_rate=0.0,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    model = T5ForConditionalGeneration(config)
    std = a["d_model"] ** -0.5  # untied head: initial logits of order one (not T5's std 1.0, for short training)
    model.lm_head.weight = nn.Parameter(torch.empty_like(model.lm_head.weight).normal_(0.0, std))
    model.config.tie_word_embeddings = False
    return model


def t5_pairs(captions: list[str], qa: list[tuple[str, str]], context: list[str], rng: random.Random, max_context: int) -> list[tuple[str, str]]:
    """(input, target) pairs: every QA pair, and each caption cut at a random word (prefix-LM);
    with `max_context`, half the inputs are led by up to that many unrelated documents."""
    pairs = list(qa)
    for caption in captions:
        words = caption.split()
        cut = rng.randint(1, len(words) - 1) if len(words) > 1 else 1
        pairs.append((" ".join(words[:cut]), " ".join(words[cut:]) or words[-1]))
    rng.shuffle(pairs)
    if not max_context:
        return pairs
    led = []
    for source, target in pairs:
        lead = rng.sample(context, rng.randint(1, max_context)) if rng.random() < 0.5 else []
        led.append((" ".join([*lead, source]), target))
    return led


def t5_reading_pairs(world: Any, first: int, count: int, rng: random.Random, questions: int = 2,
                     continuations: int = 0) -> list[tuple[str, str]]:
    """(captions + question, answer) pairs: FlanT5's reading rounds, `questions` per image of
    `count` pretrain-stream images, each led by all the image's captions in order (as probed).
    `continuations` per image: (the image's other captions + a caption's first words, the rest), so
    that completing a caption also learns to read what the encoder holds before it (BLIP-2's
    stage-2 task for FlanT5 is exactly that, with the image in place of the other captions)."""
    from vlbridge.world.generate import make_image
    from vlbridge.world.reading import t5_source

    world = world.model_copy(update={"questions_per_image": 10})
    pairs = []
    for index in range(first, first + count):
        image = make_image(world, "pretrain", index)
        pairs += [(t5_source(image.captions, qa.question), qa.answer) for qa in rng.sample(image.qas, questions)]
        for caption in rng.sample(image.captions, continuations):
            others = [c for c in image.captions if c != caption]
            words = caption.split()
            cut = rng.randint(1, len(words) - 1) if len(words) > 1 else 1
            pairs.append((" ".join([*others, " ".join(words[:cut])]), " ".join(words[cut:]) or words[-1]))
    return pairs


def t5_batches(tokenizer: Any, pairs: list[tuple[str, str]], size: int) -> list[Batch]:
    out = []
    for at in range(0, len(pairs) - size + 1, size):
        chunk = pairs[at: at + size]
        enc = tokenizer([s for s, _ in chunk], padding=True, return_tensors="pt")
        dec = tokenizer([t for _, t in chunk], padding=True, return_tensors="pt")
        labels = dec["input_ids"].masked_fill(dec["attention_mask"] == 0, -100)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out


# -- BERT ---------------------------------------------------------------------------------------


def build_bert(tokenizer: Any) -> Any:
    """BertForMaskedLM shaped like the `world` Q-Former (width, layers, heads, FFN, positions)."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=len(tokenizer), **architectures.BERT, type_vocab_size=1, pad_token_id=tokenizer.pad_token_id,
        layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = BertForMaskedLM(config)
    token_type = model.bert.embeddings.token_type_embeddings.weight
    with torch.no_grad():
        token_type.zero_()
    token_type.requires_grad_(False)
    return model


def mlm_batch(tokenizer: Any, docs: list[str], generator: torch.Generator, max_length: int) -> Batch:
    """BERT's masking: 15% of real tokens are predicted; of those 80% [MASK], 10% random, 10% kept."""
    enc = tokenizer(docs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    ids = enc["input_ids"].clone()
    special = torch.tensor([[t in tokenizer.all_special_ids for t in row] for row in ids.tolist()])
    chosen = (torch.rand(ids.shape, generator=generator) < 0.15) & ~special
    labels = enc["input_ids"].masked_fill(~chosen, -100)
    roll = torch.rand(ids.shape, generator=generator)
    ids[chosen & (roll < 0.8)] = tokenizer.mask_token_id
    randomised = chosen & (roll >= 0.8) & (roll < 0.9)
    ids[randomised] = torch.randint(len(tokenizer.all_special_ids), len(tokenizer), (int(randomised.sum()),), generator=generator)
    return {"input_ids": ids, "attention_mask": enc["attention_mask"], "labels": labels}
