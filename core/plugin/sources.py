"""What a part loads and from where, as a plugin declares it (torch-free).

A spec's optional `weight_sources(options, stage)` returns a list of `WeightSource`: each names the
option that sets it, so that vlbridge can check, before anything is built, that the file exists or
the hub model can be had (vlbridge.assemblies.reachability), and say which option to change. The
plugin knows its own defaults (a hub id per variant, a tiny variant that is random by design);
vlbridge only knows how to decide whether a local path or a hub id is reachable here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from vlbridge.errors import PluginError
from vlbridge.files.hf_config import looks_local

SourceKind = Literal["local", "hub", "random"]
SOURCE_KINDS: tuple[str, ...] = ("local", "hub", "random")
# Any one of these in the HF cache's snapshot of a hub id means that part is cached.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model")
LOCAL_MODEL = "a local directory written by save_pretrained"


@dataclass(frozen=True)
class WeightSource:
    """One thing a part loads.

    `kind` 'local': `value` is a path that must exist; 'hub': `value` is a Hugging Face hub id,
    reachable when the HF cache holds one of `files` or the hub answers; 'random': the option is
    unset and this real-size frozen part would get random weights (refused unless asked for).
    `option` is the field of the component's options that sets it ("pretrained"); the message
    to the user reads "set <slot>.options.<option> to <accepts>".
    """

    kind: SourceKind
    option: str
    accepts: str
    value: str | None = None
    what: str = "weights"  # or "tokenizer": what the part reads from it
    default: bool = False  # `value` is the option's default, not something the assembly wrote
    files: tuple[str, ...] = ()  # hub only: which files prove it is cached
    label: str = ""  # hub only: how messages name it; default "hub model '<value>'"

    @property
    def name(self) -> str:
        return self.label or f"hub model {self.value!r}"


def local(option: str, path: str, accepts: str, what: str = "weights") -> WeightSource:
    """A local file or directory that must exist."""
    return WeightSource("local", option, accepts, path, what)


def hub(option: str, hub_id: str, accepts: str, what: str = "weights", *, default: bool = False,
        files: tuple[str, ...] | None = None, label: str = "") -> WeightSource:
    """A Hugging Face hub repository (a weights or tokenizer repo unless `files` says otherwise)."""
    chosen = files if files is not None else (TOKENIZER_FILES if what == "tokenizer" else WEIGHT_FILES)
    return WeightSource("hub", option, accepts, hub_id, what, default, chosen, label)


def random_weights(option: str, accepts: str) -> WeightSource:
    """Nothing is set, so a real-size frozen part would be random."""
    return WeightSource("random", option, accepts)


def local_or_hub(option: str, value: str | None, accepts: str = LOCAL_MODEL, what: str = "weights", *,
                 default: bool = False) -> list[WeightSource]:
    """A `model`-style option: a local directory or a hub id; None loads nothing (a tiny random part)."""
    if not value:
        return []
    if looks_local(value):
        return [local(option, value, accepts, what)]
    return [hub(option, value, accepts, what, default=default)]


def file_or_random(option: str, value: str | None, accepts: str, *, random_by_design: bool) -> list[WeightSource]:
    """A `pretrained`-style option: a local file, or unset: random, which only a tiny part may be silently."""
    if value:
        return [local(option, value, accepts)]
    return [] if random_by_design else [random_weights(option, accepts)]


def checked_sources(returned: Any, option_names: Any, who: str) -> list[WeightSource]:
    """`returned` as a list of WeightSource, or PluginError saying what is wrong with the declaration."""
    if not isinstance(returned, (list, tuple)):
        raise PluginError(f"{who}: weight_sources() must return a list of vlbridge.plugin.sources.WeightSource, "
                          f"got {type(returned).__name__}")
    for source in returned:
        if not isinstance(source, WeightSource):
            raise PluginError(f"{who}: weight_sources() returned a {type(source).__name__}; expected WeightSource "
                              "(build them with vlbridge.plugin.sources.local, hub or random_weights)")
        _check_one(source, set(option_names), who)
    return list(returned)


def _check_one(source: WeightSource, option_names: set[str], who: str) -> None:
    if source.kind not in SOURCE_KINDS:
        raise PluginError(f"{who}: a WeightSource has kind {source.kind!r}; use one of {list(SOURCE_KINDS)}")
    if source.option not in option_names:
        raise PluginError(f"{who}: a WeightSource names option {source.option!r}, which its options do not have; "
                          f"name the field that sets it, one of {sorted(option_names)}")
    if source.kind != "random" and not (isinstance(source.value, str) and source.value):
        raise PluginError(f"{who}: a {source.kind!r} WeightSource for {source.option!r} needs a non-empty value (a path or hub id)")
    if source.kind == "hub" and not source.files:
        raise PluginError(f"{who}: the hub WeightSource {source.value!r} lists no files to look for in the HF cache")
    if not (isinstance(source.accepts, str) and source.accepts):
        raise PluginError(f"{who}: the WeightSource for {source.option!r} needs `accepts`, what the option takes "
                          "(e.g. 'a local directory written by save_pretrained'): users read it when the source is missing")
