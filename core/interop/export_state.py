"""Loading vlbridge's tensors into a freshly built transformers model for export, exactly.

A fresh transformers model may share tensors that vlbridge keeps apart: transformers 5 builds every
T5 with its LM head tied to the input embeddings (`T5Config` forces `tie_word_embeddings=True`),
while FlanT5's head is its own matrix. Loading both into one shared tensor keeps whichever came
last, and `save_pretrained` then writes one matrix for two: an export with other numbers and no
error. So the head is untied first where the source's is untied, and every tensor is compared
with its source after loading: anything else that shares or converts a tensor is caught here.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from vlbridge.errors import MissingWeightsError, VLBridgeError, WeightsError


def load_export_state(hf: Any, state: dict[str, torch.Tensor], llm_model: Any, what: str) -> None:
    """Load `state` into `hf` (a transformers BLIP-2-family model whose language model is
    `hf.language_model`; a retrieval one has none, and `llm_model` is None), untying its LM head where
    `llm_model` (ours) has an untied one; raise WeightsError naming what does not fit or did not
    arrive unchanged."""
    if llm_model is not None and _untied(llm_model):
        _untie(hf)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    tied = {f"language_model.{k}" for k in getattr(getattr(hf, "language_model", None), "_tied_weights_keys", None) or []}
    if unexpected or set(missing) - tied - {"language_model.lm_head.weight"}:
        raise WeightsError(f"export does not fit {what}: missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")
    loaded = hf.state_dict()
    changed = [key for key, value in state.items() if key in loaded and not torch.equal(loaded[key], value.to(loaded[key].dtype))]
    if changed:
        raise WeightsError(f"export to {what} would not keep {len(changed)} tensor(s) as they are: {', '.join(changed[:6])} "
                           "(a tensor transformers shares with another, or another dtype); this is a bug in the exporter")


def _untied(llm_model: Any) -> bool:
    """Whether our LM has an output projection of its own (not the input embedding matrix)."""
    head, embeddings = llm_model.get_output_embeddings(), llm_model.get_input_embeddings()
    return head is not None and embeddings is not None and head.weight is not embeddings.weight


def _untie(hf: Any) -> None:
    """Give the export's LM head its own parameter, and say so in its config, so that it is saved
    as a second matrix (transformers loads a checkpoint holding both untied)."""
    language_model = hf.language_model
    head, embeddings = language_model.get_output_embeddings(), language_model.get_input_embeddings()
    if head is None:
        return
    if head.weight is embeddings.weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    for config in (hf.config.text_config, language_model.config):
        config.tie_word_embeddings = False


def require_stage2(model: Any, fmt: str) -> None:
    """Refuse, saying why, a model built or loaded for stage 1: it has no LLM, and its projection
    into the LLM never trained, so there is nothing to caption with in `fmt`."""
    if model.llm is None and model.assembly.llm is not None:
        raise VLBridgeError(f"{fmt} captions with an LLM, but this model was built or loaded for stage 1: it has no LLM, and "
                            "its projection into one never trained; export a stage-2 checkpoint (train stage 2 from this one first)")


def require_present(connector: Any, written: Callable[[str], bool], fmt: str) -> None:
    """Refuse an export that would write connector tensors its checkpoint lacked (a stage-1 checkpoint
    loaded for stage 2 has an untrained projection): they hold the random values they were built
    with, and in the export nothing would tell them from trained ones. `written(name)` says whether
    the export writes our tensor `name`; the parts the format leaves out may be absent."""
    from vlbridge.modeling.connector_protocol import absent_tensors

    absent = absent_tensors(connector)
    lacking = sorted(name for name in absent if written(name))
    if lacking:
        sources = sorted({absent[name].source for name in lacking})
        stages = sorted({stage for name in lacking for stage in absent[name].stages})
        train = f"train them in stage {' or '.join(map(str, stages))} first" if stages else "load a checkpoint that holds them"
        raise MissingWeightsError(f"{fmt} would hold random values for {', '.join(lacking)}: the checkpoint "
                                  f"{', '.join(sources)} lacks them, so they hold the values they were built with; {train} "
                                  f"(vlbridge train with init_from: {sources[0]}), then export")
