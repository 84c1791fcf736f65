"""How vlbridge sets a connector's training stage, and what stage 1 asks of a connector.

`set_stage(stage)` is optional. A connector without it (a plain nn.Module, projector-like) has
stage 2 only, in which the parameters train that require gradients as its factory built them: all
of them, unless the factory froze some. Stage 1 (BLIP-2's image-text pre-training, for
Q-Former-like connectors) needs `set_stage` and every attribute the stage-1 objective uses.
Every failure names the component and what it lacks (docs/writing-plugins.md, section 5).
"""

from __future__ import annotations

from torch import nn

from vlbridge.plugin.contract import defines, missing, plugin_call
from vlbridge.errors import PluginError


# What the stage-1 objective calls on a connector (BLIP-2's ITC, ITM and ITG): part of the
# connector protocol, so the model and the plugin checks read it without importing training.
STAGE1_INTERFACE = ("tokenizer", "image_context", "query_outputs", "image_features_of", "text_features", "itm_logits",
                    "itg_logits_from_queries", "temp")


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
