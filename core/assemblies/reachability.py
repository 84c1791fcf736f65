"""Before anything is built: can every part's weights and tokenizer be had here, and would a frozen
real-size part silently get random weights?

Building BLIP-2 offline used to spend most of a minute drawing a random ViT-g before failing on a
tokenizer download. This check runs first and names every part that is missing, with the option
that supplies it. The rule for a Hugging Face hub id: reachable when the local HF cache holds it;
otherwise only when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are unset and the hub answers a short
connection probe (once per process). A random frozen part is allowed for tiny variants (random by
design) and otherwise only when the caller asks for it (`random_weights=True`, `--random-weights`).

Each component says what it loads through its spec's optional `weight_sources` (vlbridge.plugin.sources);
this module only collects those declarations and decides whether each can be had. A component
that declares none (a third-party plugin that predates the field) is not checked.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from vlbridge.errors import VLBridgeError
from vlbridge.files.hf_config import PATH_PREFIXES, cached_hub_file
from vlbridge.plugin.contract import describe, plugin_call
from vlbridge.plugin.sources import WeightSource, checked_sources

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
PROBE_SECONDS = 3.0


class UnreachableWeightsError(VLBridgeError):
    """Parts whose weights cannot be had here, or would be random without being asked for."""


@dataclass(frozen=True)
class Found:
    """A declared source, placed in its slot of the assembly."""

    slot: str
    component: str
    source: WeightSource

    @property
    def option(self) -> str:
        return f"{self.slot}.options.{self.source.option}"


def check_reachable(assembly: Any, stage: int, *, random_weights: bool = False, only: tuple[str, ...] | None = None) -> None:
    """Raise UnreachableWeightsError naming every part of `assembly` (the slots `stage` builds, or
    `only` these) that cannot be loaded here, or that would be a random real-size frozen part
    without `random_weights`."""
    problems = reachability_problems(assembly, stage, random_weights=random_weights, only=only)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise UnreachableWeightsError(f"cannot build {assembly.plan.name}: nothing was loaded, because\n{listed}")


def reachability_problems(assembly: Any, stage: int, *, random_weights: bool = False,
                          only: tuple[str, ...] | None = None) -> list[str]:
    """One line per part that cannot be loaded here (what check_reachable raises, as a list)."""
    found = [item for item in sources(assembly, stage) if only is None or item.slot in only]
    return [problem for item in found if (problem := source_problem(item, random_weights))]


def config_with_absolute_paths(assembly: Any) -> dict[str, Any]:
    """The assembly's config as a dict, with each local file or directory its parts load (their
    declared `weight_sources`) made absolute: a relative path was read against the current directory,
    so a checkpoint that kept it would load only from there."""
    config = assembly.config.model_dump(mode="json")
    for item in (item for stage in assembly.plan.stages for item in sources(assembly, stage)):
        options = (config.get(item.slot) or {}).get("options") or {}
        value = options.get(item.source.option)
        if item.source.kind == "local" and isinstance(value, str) and not Path(value).expanduser().is_absolute():
            options[item.source.option] = os.path.abspath(Path(value).expanduser())
    return config


def missing_local_sources(assembly: Any) -> list[str]:
    """One line per local file or directory that some stage of `assembly` would load and that does
    not exist: a mistake in the assembly itself, whatever the network or --random-weights say.

    Torch-free, for `validate`: only parts with an option that names a path the way `looks_local`
    reads one (absolute, ./, ../, ~) are asked for their sources, since a spec may resolve other
    values (an open_clip pretrained tag) through its library. A bare relative name is checked at build."""
    found = [item for stage in assembly.plan.stages for item in sources(assembly, stage, only_pathlike=True)
             if item.source.kind == "local"]
    return list(dict.fromkeys(problem for item in found if (problem := source_problem(item, random_weights=False))))


def sources(assembly: Any, stage: int, only_pathlike: bool = False) -> list[Found]:
    """What each part of the assembly declares it would load (stage 1 builds no LLM); with
    `only_pathlike`, only parts with an option value that looks like a local path are asked."""
    slots = [("encoder", assembly.encoder), ("connector", assembly.connector)]
    if stage == 2 and assembly.llm is not None:
        slots.append(("llm", assembly.llm))
    found: list[Found] = []
    for slot, part in slots:
        spec = part.spec
        if spec.weight_sources is None or (only_pathlike and not _names_a_path(part.options)):
            continue
        who = describe(spec)
        returned = plugin_call(who, "weight_sources()", spec.weight_sources, part.options, stage)
        declared = checked_sources(returned, spec.options.model_fields, who)
        found.extend(Found(slot, spec.name, source) for source in declared)
    return found


def _names_a_path(options: Any) -> bool:
    values = options.model_dump().values() if options is not None else ()
    return any(isinstance(value, str) and value.startswith(PATH_PREFIXES) for value in values)


def source_problem(item: Found, random_weights: bool) -> str | None:
    """Why the declared source cannot be had (None when it can)."""
    source = item.source
    where = f"{item.slot} {item.component} ({source.what})"
    option = f"the default of {item.option}" if source.default else item.option
    fix = f"set {item.option} to {source.accepts}"
    if source.kind == "random":
        if random_weights:
            return None
        return (f"{where}: {item.option} is not set, so this real-size frozen part would get random weights; "
                f"{fix}, or ask for random weights on purpose (--random-weights, random_weights=True)")
    assert source.value is not None  # checked_sources refuses a local or hub source without one
    if source.kind == "local":
        if Path(source.value).expanduser().exists():
            return None
        return f"{where}: {option} {source.value!r} does not exist; {fix}"
    if in_hf_cache(source.value, source.files):
        return None
    why = hub_unreachable()
    if why is None:
        return None  # downloaded when built
    return (f"{where}: {source.name} ({option}) is not in the local Hugging Face cache and {why}; "
            f"{fix}, or fetch it once where the hub is reachable")


def in_hf_cache(hub_id: str, files: tuple[str, ...]) -> bool:
    """The local HF cache holds `hub_id` with one of `files` (no network)."""
    return any(cached_hub_file(hub_id, name) is not None for name in files)


def hub_unreachable() -> str | None:
    """Why the hub cannot be used to download (None when it can)."""
    offline = [name for name in OFFLINE_VARIABLES if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")]
    if offline:
        return f"{offline[0]} is set"
    return _probe(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@lru_cache(maxsize=4)
def _probe(endpoint: str) -> str | None:
    """One short TCP connection to the hub (cached: asked once per process)."""
    url = urlparse(endpoint)
    host, port = url.hostname or endpoint, url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        return f"{host} cannot be reached ({type(exc).__name__}: {exc}; set HF_HUB_OFFLINE=1 to skip this probe)"
    return None
