"""Start the soft prompt at the scale of the frozen LLM's own token embeddings.

Why: a fresh output layer (BLIP-2's `llm_proj`, a LLaVA projector's last Linear) at torch's default
init maps the connector's features to a soft prompt far from the norm of the embeddings the frozen
LLM was trained on (about 11x for the world demo's Q-Former: docs/demo-findings.md section 7). Stage
2 then spends its first steps, and large gradients through the connector's body, on that scale,
which overwrites what stage 1 learnt (section 12). `soft_prompt_norm: llm` (a stage-2 objective
option) measures both norms on the run's first batch (the LLM's: of that batch's text) and scales
that output layer once, before the first step of a fresh run; `vocabulary` takes the LLM's norm as
the mean over its whole vocabulary instead. A resumed run keeps its checkpoint's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from vlbridge.errors import VLBridgeError
from vlbridge.plugin.contract import describe, require
from vlbridge.train.distributed import is_distributed

if TYPE_CHECKING:
    from vlbridge.modeling.model import VLBridgeModel


@dataclass(frozen=True)
class SoftPromptScale:
    """What the calibration did: the layer it scaled and the norms before and after."""

    layer: str
    before: float  # the soft prompt's mean per-token L2 norm on the first batch, at init
    target: float  # the LLM's embeddings' mean per-token L2 norm (of the batch's text, or of its vocabulary)
    factor: float

    def line(self) -> str:
        return (f"soft prompt scaled to the LLM's embedding norm: {self.before:.3g} -> {self.target:.3g} "
                f"(connector output layer {self.layer!r} x {self.factor:.3g})")


def output_linear(connector: nn.Module, run: Callable[[], torch.Tensor]) -> tuple[str, nn.Linear, torch.Tensor]:
    """The nn.Linear whose output the connector returns as it is, found by running it once; an error
    when the connector's output comes from anything else (a norm, a sum, a plugin's own layer)."""
    outputs: list[tuple[str, nn.Linear, torch.Tensor]] = []
    hooks = [module.register_forward_hook(lambda mod, args, out, name=name: outputs.append((name, mod, out)))
             for name, module in connector.named_modules() if isinstance(module, nn.Linear)]
    try:
        result = run()
    finally:
        for hook in hooks:
            hook.remove()
    for name, module, out in outputs:
        if out is result:
            return name or type(connector).__name__, module, result
    raise VLBridgeError(
        f"soft_prompt_norm (llm, vocabulary) scales the connector's output layer, but {type(connector).__name__}'s output is not "
        "the output of one of its torch.nn.Linear modules; use soft_prompt_norm: init with this connector")


def mean_token_norm(tokens: torch.Tensor) -> torch.Tensor:
    """Mean L2 norm of the last dimension's vectors, in fp32; when distributed, over every rank's
    vectors (sums and counts all-reduced), so N processes scale as one process with their whole batch."""
    norms = tokens.detach().float().norm(dim=-1).flatten()
    total = torch.stack([norms.sum(), torch.tensor(float(norms.numel()), device=norms.device)])
    if is_distributed():
        torch.distributed.all_reduce(total)
    return total[0] / total[1]


VOCABULARY_CHUNK = 4096  # embedding rows measured at a time (a 50k x 2560 table need not be copied whole)


def text_norm(model: "VLBridgeModel", texts: list[str]) -> torch.Tensor:
    """Mean norm of the LLM's embeddings of the tokens of `texts` (what it will read)."""
    ids = [i for row in model.llm.tokenizer(list(texts), add_special_tokens=False)["input_ids"] for i in row]
    if not ids:
        raise VLBridgeError("soft_prompt_norm: llm needs text in the first batch to measure the LLM's embedding norm; it had none")
    return mean_token_norm(model.llm.embed_tokens(torch.tensor(ids, device=model.llm.device)))


def vocabulary_norm(model: "VLBridgeModel") -> torch.Tensor:
    """Mean norm of the LLM's embeddings of every token its tokenizer has (each token alike)."""
    size = len(model.llm.tokenizer)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, size, VOCABULARY_CHUNK):
        ids = torch.arange(start, min(start + VOCABULARY_CHUNK, size), device=model.llm.device)
        total += model.llm.embed_tokens(ids).float().norm(dim=-1).sum().double().cpu()
    return (total / size).float()


@torch.no_grad()
def scale_soft_prompt(model: "VLBridgeModel", image_embeds: torch.Tensor, instructions: list[str] | None,
                      texts: list[str], target_of: str = "llm") -> SoftPromptScale:
    """Scale the connector's output layer so the soft prompt of these images has the LLM's embedding
    norm: of `texts` (the batch's text, as the LLM will read it; `target_of` "llm") or of its whole
    vocabulary ("vocabulary")."""
    require(model.llm, ("tokenizer", "embed_tokens"), describe(model.plan.llm),
            f"soft_prompt_norm: {target_of} measures the LLM's token embeddings through them (a transformers tokenizer "
            "and embed_tokens(ids), as the built-in and hf-* LLMs have); use soft_prompt_norm: init with this LLM")
    name, layer, visual = output_linear(model.connector, lambda: model.visual_tokens(image_embeds=image_embeds, instructions=instructions))
    target = vocabulary_norm(model) if target_of == "vocabulary" else text_norm(model, texts)
    before = mean_token_norm(visual)
    if not (torch.isfinite(before) and before > 0):
        raise VLBridgeError(f"soft_prompt_norm: {target_of} cannot scale a soft prompt of norm {before.item()}")
    factor = (target.to(before.device) / before).item()
    layer.weight.mul_(factor)
    if layer.bias is not None:
        layer.bias.mul_(factor)
    return SoftPromptScale(name, before.item(), target.item(), factor)

