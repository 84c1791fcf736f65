"""Reading an LLM's forward output: one place for the stage-2 objective and lmms-eval's scoring, so
both accept what docs/writing-plugins.md promises (an object with `loss` and `logits` attributes,
and optionally `labels`) and name the plugin (`who`, as vlbridge.plugin.contract.describe gives it) when it is not."""

from __future__ import annotations

from typing import Any

import torch

from vlbridge.errors import PluginError


def logits_of(who: str, output: Any) -> torch.Tensor:
    """The `logits` tensor of an LLM's forward output, or an error naming the plugin (`who`)."""
    logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise PluginError(f"{who}: its forward returned a {type(output).__name__} without a `logits` tensor attribute; "
                          "it must return an object with `loss` and `logits` attributes, as transformers' ModelOutput "
                          "(docs/writing-plugins.md, 5.4)")
    return logits


def aligned_labels(who: str, output: Any, labels: torch.Tensor, visual_tokens: int, ignore_index: int) -> torch.Tensor:
    """The labels that line up with `output.logits` of a decoder-only forward on `[visual; text]`:
    the output's own `labels` where the LLM placed the visual tokens itself (at a placeholder),
    else `labels` behind `visual_tokens` positions of `ignore_index`."""
    logits = logits_of(who, output)
    placed = getattr(output, "labels", None)
    if placed is not None:
        return placed.to(logits.device)
    labels = labels.to(logits.device)
    if logits.dim() != 3 or logits.shape[1] != visual_tokens + labels.shape[1]:
        raise PluginError(f"{who}: its forward returned logits of shape {tuple(logits.shape)} for {visual_tokens} visual and "
                          f"{labels.shape[1]} text tokens; a decoder-only LLM's logits must cover [visual; text], "
                          f"({labels.shape[0]}, {visual_tokens + labels.shape[1]}, vocab), or its output must carry the "
                          "`labels` aligned with them (docs/writing-plugins.md, 5.4)")
    return torch.cat([labels.new_full((labels.shape[0], visual_tokens), ignore_index), labels], dim=1)


def lm_loss(who: str, output: Any) -> torch.Tensor:
    """The mean LM loss a forward given `labels` returns: a scalar tensor, or an error saying so
    (a None or a float failed later as an arithmetic TypeError that named nothing)."""
    loss = getattr(output, "loss", None)
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
        shown = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else repr(loss)
        raise PluginError(f"{who}: its forward was given labels but returned loss={shown}; it must return the mean LM loss "
                          "over the labels that are not -100 as a scalar tensor (docs/writing-plugins.md, 5.4)")
    return loss


def prompt_lengths(ids: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """(B,) how many leading tokens of each text are its prompt's: the prompt tokenised alone, counted
    while its tokens agree with the text's. A prompt ending in a space ("a photo of ") tokenises that
    space alone, but inside the text BPE merges it into the caption's first word, which must stay a target."""
    width = min(ids.shape[1], prompt_ids.shape[1])
    agree = ids[:, :width].eq(prompt_ids[:, :width].to(ids.device)) & prompt_mask[:, :width].to(ids.device).bool()
    return agree.long().cumprod(dim=1).sum(dim=1)
