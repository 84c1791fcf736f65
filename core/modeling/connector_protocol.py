"""How vlbridge sets a connector's training stage, and what stage 1 asks of a connector.

`set_stage(stage)` is optional. A connector without it (a plain nn.Module, projector-like) has
stage 2 only, in which the parameters train that require gradients as its factory built them: all
of them, unless the factory froze some. Stage 1 (BLIP-2's image-text pre-training, for
Q-Former-like connectors) needs `set_stage` and every attribute the stage-1 objective uses.
Every failure names the component and what it lacks (docs/writing-plugins.md, section 5).

It also keeps the record of a connector's *absent* tensors: those the checkpoint it was loaded from
lacked (one written before checkpoints held the whole connector, or an import without heads). They
hold the random values they were built with, so every submodule owning one refuses to run
(`MissingWeightsError`) until training gives it values; saving lists them instead of writing them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlbridge.plugin.contract import defines, missing, plugin_call, returned_tensor
from vlbridge.errors import MissingWeightsError, PluginError
from vlbridge.files.checkpoint import ConnectorState

_RECORD = "_vlbridge_absent"  # the connector attribute holding its AbsentRecord


# What the stage-1 objective calls on a connector (BLIP-2's ITC, ITM and ITG): part of the
# connector protocol, so the model and the plugin checks read it without importing training.
STAGE1_INTERFACE = ("tokenizer", "image_context", "query_outputs", "image_features_of", "text_features", "itm_logits",
                    "itg_logits_from_queries", "temp")


class Stage1Calls:
    """A connector's stage-1 interface as the stage-1 objective calls it, each answer held to the
    guide (5.3) where the objective receives it: a wrong type or shape is a PluginError naming the
    connector and the call, not an error inside a loss (a check of type and shape, nothing per
    element). Its other attributes are the connector's."""

    def __init__(self, connector: nn.Module, who: str) -> None:
        self.connector, self.who = connector, who

    def __getattr__(self, name: str) -> Any:
        return getattr(self.connector, name)

    def image_context(self, image_embeds: torch.Tensor) -> Any:
        context = self.connector.image_context(image_embeds)
        if not callable(getattr(context, "select", None)):
            raise PluginError(f"{self.who}: image_context(image_embeds) returned a {type(context).__name__} without a select(rows) "
                              "method; it must return the images as the other stage-1 methods read them (docs/writing-plugins.md, 5.3)")
        return context

    def query_outputs(self, context: Any, return_layer_kv: bool = False) -> Any:
        what = f"query_outputs(context, return_layer_kv={return_layer_kv})"
        out = self.connector.query_outputs(context, return_layer_kv=return_layer_kv)
        if not return_layer_kv:
            return returned_tensor(self.who, what, out, (None, None, None), "the query outputs (B, Q, H)")
        if not (isinstance(out, tuple) and len(out) == 2):
            raise PluginError(f"{self.who}: {what} returned a {type(out).__name__}; it must return the pair (query outputs, "
                              "per-layer state for ITG) (docs/writing-plugins.md, 5.3)")
        return returned_tensor(self.who, what + "[0]", out[0], (None, None, None), "the query outputs (B, Q, H)"), out[1]

    def image_features_of(self, query_out: torch.Tensor) -> torch.Tensor:
        out = self.connector.image_features_of(query_out)
        return returned_tensor(self.who, "image_features_of(query_out)", out, (query_out.shape[0], None, None),
                               "the ITC image features (B, Q, E)")

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.connector.text_features(input_ids, attention_mask)
        return returned_tensor(self.who, "text_features(input_ids, attention_mask)", out, (input_ids.shape[0], None),
                               "the ITC text features (B, E)")

    @property
    def temp(self) -> torch.Tensor:
        return returned_tensor(self.who, "temp", self.connector.temp, (), "the ITC temperature as a scalar")

    def itm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: Any) -> torch.Tensor:
        what = "itm_logits(input_ids, attention_mask, images)"
        out = self.connector.itm_logits(input_ids, attention_mask, images)
        return returned_tensor(self.who, what, out, (input_ids.shape[0], 2), "no-match / match logits (B, 2)")

    def itg_logits_from_queries(self, layer_kv: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        what = "itg_logits_from_queries(layer_kv, input_ids, attention_mask)"
        out = self.connector.itg_logits_from_queries(layer_kv, input_ids, attention_mask)
        return returned_tensor(self.who, what, out, (*input_ids.shape, None), "the text's next-token logits (B, T, V)")


def set_connector_stage(connector: nn.Module, stage: int, who: str) -> None:
    """Choose which of the connector's parameters train in `stage` (the caller checked that the
    spec declares the stage); `who` names the component in errors."""
    if stage == 1:
        absent = missing(connector, ("set_stage", *STAGE1_INTERFACE))
        if absent:
            raise PluginError(f"{who} cannot train in stage 1: its module ({type(connector).__name__}) lacks {', '.join(absent)}. "
                              "Stage 1 needs set_stage(stage) and the stage-1 interface (docs/writing-plugins.md, section 5); "
                              "a connector without them declares stages=(2,) and trains in stage 2 only")
    if defines(connector, "set_stage"):
        plugin_call(who, f"set_stage({stage})", connector.set_stage, stage)
    elif stage != 2:
        raise PluginError(f"{who} has no set_stage(stage), so it trains in stage 2 only, not stage {stage}")


def trainable_names(connector: nn.Module, stage: int, current: int, who: str) -> set[str]:
    """Names of the parameters that train in `stage`; the connector is left set to stage `current`."""
    set_connector_stage(connector, stage, who)
    try:
        return {name for name, param in connector.named_parameters() if param.requires_grad}
    finally:
        set_connector_stage(connector, current, who)


@dataclass(frozen=True)
class Absence:
    """Why a tensor is absent: the checkpoint that lacked it (or held it in another shape, `misfit`:
    "(7, 3) in the file, (529, 64) here"), and the stages that train it."""

    source: str
    stages: tuple[int, ...]
    misfit: str = ""


@dataclass
class AbsentRecord:
    who: str  # the component, as errors name it
    tensors: dict[str, Absence]
    handles: list[RemovableHandle]


@dataclass(frozen=True)
class _Refuse:
    """Forward pre-hook on a submodule whose tensors are absent: running it would compute with
    random weights and return plausible-looking nonsense, so it raises instead."""

    who: str
    module: str
    absent: tuple[tuple[str, Absence], ...]

    def __call__(self, module: nn.Module, args: object) -> None:
        sources = sorted({absence.source for _, absence in self.absent})
        stages = sorted({stage for _, absence in self.absent for stage in absence.stages})
        train = (f"train them: they train in stage {' or '.join(map(str, stages))} (vlbridge train with that stage and "
                 f"init_from: {sources[0]})" if stages else "they train in no stage of this connector")
        misfits = [f"{name} ({absence.misfit})" for name, absence in self.absent if absence.misfit]
        lacking = [name for name, absence in self.absent if not absence.misfit]
        parts = [f"holds {', '.join(misfits)} in another shape than this connector's (its own stage never trained them, so "
                 "they were left out: another configuration of the connector saved it, or the file was edited)"] if misfits else []
        if lacking:
            parts.append(f"lacks {', '.join(lacking)} (it was saved before vlbridge kept the whole connector, or its source had none)")
        why = " and ".join(parts)
        raise MissingWeightsError(
            f"{self.who}: {self.module} has no weights to run with: the checkpoint {', '.join(sources)} {why}, so they hold "
            f"random values. Load a checkpoint that holds them, or {train}")


def absent_tensors(connector: nn.Module) -> dict[str, Absence]:
    """The connector's absent tensors (empty for a built or fully loaded one)."""
    record = connector.__dict__.get(_RECORD)
    return dict(record.tensors) if record is not None else {}


def set_absent(connector: nn.Module, tensors: Mapping[str, Absence], who: str) -> None:
    """Record `tensors` as the connector's absent ones, replacing any earlier record, and make each
    submodule that owns one refuse to run. A tensor held by the connector module itself (not a
    submodule) is recorded but cannot be guarded: a connector reading one in inference must check
    `absent_tensors` itself (the Q-Former's are the query tokens, which every stage trains, and the
    ITC temperature, which only the stage-1 loss reads and trains)."""
    old = connector.__dict__.pop(_RECORD, None)
    for handle in old.handles if old is not None else []:
        handle.remove()
    owners: dict[str, list[tuple[str, Absence]]] = {}
    for name in sorted(tensors):
        owner = name.rpartition(".")[0]
        if owner:
            owners.setdefault(owner, []).append((name, tensors[name]))
    handles = [connector.get_submodule(owner).register_forward_pre_hook(_Refuse(who, owner, tuple(absent)))
               for owner, absent in owners.items()]
    connector.__dict__[_RECORD] = AbsentRecord(who, dict(tensors), handles)


def mark_trained(connector: nn.Module) -> None:
    """Training gives the parameters that now require gradients their values: they are absent no more."""
    record: AbsentRecord | None = connector.__dict__.get(_RECORD)
    if record is None:
        return
    training = {name for name, param in connector.named_parameters() if param.requires_grad}
    set_absent(connector, {name: why for name, why in record.tensors.items() if name not in training}, record.who)


def stages_training(connector: nn.Module, names: Iterable[str], stages: Iterable[int], current: int, who: str) -> dict[str, tuple[int, ...]]:
    """For each name, the stages (of `stages`) in which it trains; the connector is left at `current`."""
    trains = {stage: trainable_names(connector, stage, current, who) for stage in stages}
    return {name: tuple(stage for stage, trained in trains.items() if name in trained) for name in names}


def connector_state(connector: nn.Module) -> ConnectorState:
    """The connector's whole state dict (parameters and buffers, whatever trains now), less its
    absent tensors, which are listed instead: written, their random values would pass for trained."""
    absent = absent_tensors(connector)
    tensors = {name: t.detach() for name, t in connector.state_dict().items() if name not in absent}
    return ConnectorState(tensors, sorted(absent))
