"""The few error types vlbridge raises; each message names what is wrong and what would be right."""

from __future__ import annotations


class VLBridgeError(Exception):
    """Base class: an error meant to be shown to the user as it is (the CLI exits 2 on these)."""


class PluginError(VLBridgeError):
    """A plugin failed to load or returned something it should not (fatal only in strict mode)."""


class UnknownComponentError(VLBridgeError, KeyError):
    """A component name that no loaded plugin provides."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class IncompatibleError(VLBridgeError):
    """Raised by a connector's shape function when it cannot join the given encoder and LLM."""


class AssemblyError(VLBridgeError):
    """An assembly failed validation; carries every problem found in one pass."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        listed = "\n".join(f"  - {p}" for p in self.problems)
        count = len(self.problems)
        super().__init__(f"assembly {source} is invalid ({count} problem{'s' if count != 1 else ''}):\n{listed}")


class WeightsError(VLBridgeError):
    """Weights that cannot be loaded as asked: missing file, wrong shape, missing or unexpected keys."""
