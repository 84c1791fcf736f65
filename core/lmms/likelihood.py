"""The log-probability of a continuation under the visual prompt, and whether greedy decoding would
produce it: what lmms-eval's `loglikelihood` (and so every multiple-choice task) asks of a model.

The text is built as generation builds it (the task prompt through the LLM's template, the
instruction for an instruction-aware connector), so a choice is scored in the context the model
answers in. Decoder-only: [visual; prompt + continuation], the continuation's tokens being those the
whole text has after the prompt's own (counted while they agree with the text's: a prompt's trailing
space, a token of its own alone, merges into the continuation's first word); encoder-decoder: the encoder reads [visual;
prompt], the decoder the continuation (no end token).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from vlbridge.errors import VLBridgeError
from vlbridge.modeling.llm_output import aligned_labels, logits_of, prompt_lengths
from vlbridge.modeling.inference import hard_context
from vlbridge.modeling.prompts import format_prompts
from vlbridge.plugin.contract import describe, tokenized

IGNORE = -100


@torch.no_grad()
def continuation_scores(model: Any, images: Sequence[Any], instructions: Sequence[str], continuations: Sequence[str],
                        batch_size: int = 8) -> list[tuple[float, bool]]:
    """(sum of the continuation's token log-probabilities, greedy would produce it) per request."""
    if model.llm is None:
        raise VLBridgeError("this model was built for stage 1 and has no LLM; load it with stage=2 to score continuations")
    who = describe(model.plan.llm)
    out: list[tuple[float, bool]] = []
    for start in range(0, len(instructions), batch_size):
        chunk = slice(start, start + batch_size)
        visual = model.visual_tokens(model.pixel_values(list(images[chunk])), instructions=list(instructions[chunk]))
        prompts = format_prompts(who, model.llm, list(instructions[chunk]))
        if model.llm.is_encoder_decoder:
            logits, labels = _encoder_decoder(who, model.llm, visual, prompts, list(continuations[chunk]))
        else:
            logits, labels = _decoder_only(who, model.llm, visual, prompts, list(continuations[chunk]), hard_context(model))
        out.extend(_sum_and_greedy(logits, labels))
    return out


def _decoder_only(who: str, llm: Any, visual: torch.Tensor, prompts: list[str], continuations: list[str],
                  context: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels aligned (logit t predicts label t), labels only on the continuation; a text
    longer than the LLM's `context` is refused (its forward failed with a bare IndexError)."""
    ids, mask = tokenized(who, llm, [p + c for p, c in zip(prompts, continuations)], padding_side="right")
    prompt_tokens = prompt_lengths(ids, *tokenized(who, llm, prompts, padding_side="right"))  # while they agree with the text's
    lengths = mask.sum(dim=1)
    empty = [c for c, n, p in zip(continuations, lengths.tolist(), prompt_tokens.tolist()) if n <= p]
    if empty:
        raise VLBridgeError(f"continuation(s) {empty[:3]} add no token to their prompt; nothing to score")
    if context is not None and visual.shape[1] + ids.shape[1] > context:
        raise VLBridgeError(f"a request to score is {visual.shape[1] + ids.shape[1]} tokens long (visual tokens, prompt and "
                            f"continuation), past the LLM's context of {context} positions; shorten the task's text or "
                            "the prompt")
    positions = torch.arange(ids.shape[1], device=ids.device)[None, :]
    labels = ids.masked_fill(mask.eq(0) | (positions < prompt_tokens[:, None]), IGNORE)
    output = llm(visual, ids, mask, labels=labels)
    aligned = aligned_labels(who, output, labels, visual.shape[1], IGNORE)
    return output.logits[:, :-1], aligned[:, 1:]


def _encoder_decoder(who: str, llm: Any, visual: torch.Tensor, prompts: list[str],
                     continuations: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = tokenized(who, llm, prompts, padding_side="right")
    targets, target_mask = tokenized(who, llm, continuations, padding_side="right", add_special_tokens=False)
    if target_mask.sum(dim=1).eq(0).any():
        raise VLBridgeError(f"a continuation in {continuations[:3]} has no token; nothing to score")
    output = llm(visual, ids, mask, labels=targets, decoder_attention_mask=target_mask)
    logits = logits_of(who, output)
    labels = targets.to(logits.device).masked_fill(target_mask.to(logits.device).eq(0), IGNORE)
    return logits, labels


def _sum_and_greedy(logits: torch.Tensor, labels: torch.Tensor) -> list[tuple[float, bool]]:
    scored = labels.ne(IGNORE)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token = logprobs.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    total = (token * scored).sum(dim=1)
    greedy = (logits.argmax(dim=-1).eq(labels) | ~scored).all(dim=1)
    return [(float(t), bool(g)) for t, g in zip(total.tolist(), greedy.tolist())]
