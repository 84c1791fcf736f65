"""The hooks a vlbridge plugin implements. Hooks only ever gain (optional) arguments, never lose them."""

from __future__ import annotations

import pluggy

PROJECT = "vlbridge"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def vlbridge_register_encoders() -> list:
    """Declare image encoders.

    :return: a list of :class:`vlbridge.EncoderSpec`, declarations only (no torch import).
    """


@hookspec
def vlbridge_register_llms() -> list:
    """Declare language models.

    :return: a list of :class:`vlbridge.LLMSpec`, declarations only (no torch import).
    """


@hookspec
def vlbridge_register_connectors() -> list:
    """Declare connectors (Q-Former, projectors, ...).

    :return: a list of :class:`vlbridge.ConnectorSpec`, declarations only (no torch import).
    """


HOOK_KINDS = {
    "vlbridge_register_encoders": "encoder",
    "vlbridge_register_llms": "llm",
    "vlbridge_register_connectors": "connector",
}
