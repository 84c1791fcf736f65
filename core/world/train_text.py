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
from typing import Any, Callable

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


def fit(model: Any, make_batch: Callable[[int], Batch], recipe: TextRecipe, name: str, log: Callable[[str], None]) -> float:
    """Train `model` on `make_batch(step)` for the recipe's steps; return the final loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    model.train()
    start, loss = time.perf_counter(), torch.tensor(float("nan"))
    for step in range(recipe.steps):
        progress = max(0, step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        scale = (step + 1) / recipe.warmup if step < recipe.warmup else 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * scale
        loss = model(**make_batch(step)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 50 == 0 or step == recipe.steps - 1:
            log(f"{name} step {step}/{recipe.steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    return float(loss.item())


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


READING_START = 40_000_000  # pretrain-stream images the reading rounds draw from (after the LM's documents)


def reading_example(tokenizer: Any, world: Any, index: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """One reading-comprehension sample: 1-5 shuffled captions of a pretrain-stream image, then one
    of its (10) questions; labels only on the answer and its newline."""
    from vlbridge.world.generate import make_image

    image = make_image(world, "pretrain", READING_START + index)
    captions = list(image.captions)
    rng.shuffle(captions)
    captions = captions[: rng.randint(1, len(captions))]
    context = [t for c in captions for t in tokenizer(c + "\n")["input_ids"]]
    qa = rng.choice(image.qas)
    question = tokenizer(VQA_PROMPT.format(qa.question))["input_ids"]
    answer = tokenizer(" " + qa.answer + "\n", add_special_tokens=False)["input_ids"]
    return context + question + answer, [-100] * (len(context) + len(question)) + answer


def reading_batches(tokenizer: Any, world: Any, batch: int) -> Callable[[int], Batch]:
    """`fit`'s batch `step`: reading samples (see reading_example), right-padded, answers labelled."""
    world = world.model_copy(update={"questions_per_image": 10})
    rng = random.Random(0)  # steps are asked for in order, so the draws follow the step number

    def make(step: int) -> Batch:
        samples = [reading_example(tokenizer, world, step * batch + j, rng) for j in range(batch)]
        length = max(len(ids) for ids, _ in samples)
        return {"input_ids": torch.tensor([i + [tokenizer.pad_token_id] * (length - len(i)) for i, _ in samples]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i, _ in samples]),
                "labels": torch.tensor([lab + [-100] * (length - len(lab)) for _, lab in samples])}

    return make


@torch.no_grad()
def context_qa_accuracy(model: Any, tokenizer: Any, images: list[Any], with_context: bool) -> float:
    """Exact-match accuracy of greedy answers to each image's questions, after its captions (as
    the stream shows them) or with no context. The gap between the two is what a soft visual
    prompt can hope to use: an LLM that does not read its context ignores any bridge."""
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    right = total = 0
    for image in images:
        context = [t for c in image.captions for t in tokenizer(c + "\n")["input_ids"]] if with_context else []
        for qa in image.qas:
            ids = torch.tensor([context + tokenizer(VQA_PROMPT.format(qa.question))["input_ids"]])
            out = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=newline, pad_token_id=tokenizer.pad_token_id)
            answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
            right += answer == qa.answer
            total += 1
    return round(right / max(1, total), 4)


def build_opt(tokenizer: Any) -> Any:
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        **architectures.OPT, do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return OPTForCausalLM(config)


def opt_stream(tokenizer: Any, docs: list[str]) -> list[int]:
    """Every document as OPT sees one ("</s>" + text + "\\n"), concatenated."""
    ids = tokenizer([d + "\n" for d in docs])["input_ids"]
    return [token for row in ids for token in row]


def opt_blocks(stream: list[int], block: int, batch: int) -> Callable[[int], Batch]:
    """Batch `step`: consecutive `block`-token windows of the stream (wrapping around)."""
    blocks = len(stream) // block

    def make(step: int) -> Batch:
        rows = [stream[((step * batch + k) % blocks) * block:][:block] for k in range(batch)]
        ids = torch.tensor(rows)
        return {"input_ids": ids, "labels": ids.clone()}

    return make


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
