"""The few error types vlbridge raises; each message names what is wrong and what would be right."""

from __future__ import annotations


class VLBridgeError(Exception):
    """Base class: an error meant to be shown to the user as it is (the CLI exits 2 on these)."""


class PluginError(VLBridgeError):
    """A plugin failed to load or returned something it should not (fatal at load only in strict
    mode), or a component it built fails what vlbridge calls it for (named in the message)."""


class PluginWarning(UserWarning):
    """A plugin whose declarations disagree with what it builds, in a way that still runs (a
    trainable-parameter count the plan then states wrongly); check_plugin treats it as an error."""


class AssemblyWarning(UserWarning):
    """What a valid assembly's plan warns about (a plugin part shadowing a built-in's name, a context
    that relative positions run past), said when it is built too, not only by `vlbridge validate`."""


class UntrainedWarning(UserWarning):
    """A model asked for a later stage than its checkpoint's: the tensors only that stage trains hold
    the values they were built with, and what reads them runs on them without an error."""


class CacheWarning(UserWarning):
    """A feature cache that can be used but may hold other features than vlbridge computes now
    (here, not in vlbridge.train.cache, so that the CLI can name it without importing torch)."""


class DataWarning(UserWarning):
    """Training data that is used, but not as its annotations literally say (one image file listed
    under two ids trains as one image), so that the user can fix the data if that was not meant."""


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


class InputFileError(VLBridgeError, ValueError):
    """A user's file that is missing, binary, not UTF-8, empty or not the JSON/YAML it should be.

    Also a ValueError, so an option validator that reads a file (a model's config.json) reports it
    as that option's problem. `problem` is the message without the file's name, for errors that
    list problems under the file already (AssemblyError, TrainConfigError).
    """

    def __init__(self, message: str, path: str, problem: str):
        super().__init__(message, path, problem)  # all in args, so the error pickles across workers
        self.path = path
        self.problem = problem

    def __str__(self) -> str:
        return str(self.args[0])


class WeightsError(VLBridgeError):
    """Weights that cannot be loaded as asked: missing file, wrong shape, missing or unexpected keys."""


class MissingWeightsError(WeightsError):
    """A part of the model that its checkpoint lacked (it was never saved, or the source had none)
    is used: refused rather than run with the random values it was built with."""


class UnreadableImagesError(VLBridgeError):
    """Evaluation images that cannot be read, found before the model ran; the message names the first
    few, `images` holds every one (vlbridge.evaluation.readable.UnreadableImage: image_id, name, reason)."""

    def __init__(self, message: str, images: list):
        super().__init__(message, images)  # all in args, so the error pickles
        self.images = list(images)

    def __str__(self) -> str:
        return str(self.args[0])
