"""Before anything is built: can every part's weights and tokenizer be had here, and would a frozen
real-size part silently get random weights?

Building BLIP-2 offline used to spend most of a minute drawing a random ViT-g before failing on a
tokenizer download. This check runs first and names every part that is missing, with the option
that supplies it. The rule for a Hugging Face hub id: reachable when the local HF cache holds it;
otherwise only when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are unset and the hub answers a short
connection probe (once per process). A random frozen part is allowed for tiny variants (random by
design) and otherwise only when the caller asks for it (`random_weights=True`, `--random-weights`).

Only vlbridge's own components are known here; a third-party component's sources are its own affair.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal
from urllib.parse import urlparse

from vlbridge.errors import VLBridgeError

Kind = Literal["local", "hub", "open_clip", "random"]
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
PROBE_SECONDS = 3.0
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model")
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


Rule = Callable[[str, Any, int], list["Source"]]  # (slot, options, stage) -> what the part loads


class UnreachableWeightsError(VLBridgeError):
    """Parts whose weights cannot be had here, or would be random without being asked for."""


@dataclass(frozen=True)
class Source:
    """One thing a part loads: `value` (a path, hub id or open_clip tag) set by `option`."""

    slot: str
    what: str
    kind: Kind
    value: str | None
    option: str
    fix: str = ""
    default: bool = False  # `value` is the option's default, not something the assembly wrote
    component: str = ""


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
    found = [source for source in sources(assembly, stage) if only is None or source.slot in only]
    return [problem for source in found if (problem := source_problem(source, random_weights))]


def sources(assembly: Any, stage: int) -> list[Source]:
    """What each built-in part of the assembly would load (stage 1 builds no LLM)."""
    slots = [("encoder", assembly.encoder), ("connector", assembly.connector)]
    if stage == 2 and assembly.llm is not None:
        slots.append(("llm", assembly.llm))
    found: list[Source] = []
    for slot, part in slots:
        rule = _RULES.get(part.spec.name)
        if rule is not None and part.spec.factory.startswith("vlbridge.plugins."):
            found.extend(replace(source, component=part.spec.name) for source in rule(slot, part.options, stage))
    return found


def source_problem(source: Source, random_weights: bool) -> str | None:
    """Why `source` cannot be had (None when it can)."""
    where = f"{source.slot} {source.component} ({source.what})"
    option = f"the default of {source.option}" if source.default else source.option
    if source.kind == "random":
        if random_weights:
            return None
        return (f"{where}: {source.option} is not set, so this real-size frozen part would get random weights; "
                f"{source.fix}, or ask for random weights on purpose (--random-weights, random_weights=True)")
    assert source.value is not None
    if source.kind == "local":
        if Path(source.value).expanduser().exists():
            return None
        return f"{where}: {option} {source.value!r} does not exist; {source.fix}"
    files = {"weights": WEIGHT_FILES, "tokenizer": TOKENIZER_FILES}.get(source.what, WEIGHT_FILES)
    hub_id, label = source.value, f"hub model {source.value!r}"
    if source.kind == "open_clip":
        hub_id, files, label = _open_clip_hub_id(source.value), OPEN_CLIP_FILES, f"open_clip weights {source.value!r}"
    if hub_id is not None and in_hf_cache(hub_id, files):
        return None
    why = hub_unreachable()
    if why is None:
        return None  # downloaded when built
    return (f"{where}: {label} ({option}) is not in the local Hugging Face cache and {why}; "
            f"{source.fix}, or fetch it once where the hub is reachable")


def in_hf_cache(hub_id: str, files: tuple[str, ...]) -> bool:
    """The local HF cache holds `hub_id` with one of `files` (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for name in files:
        try:
            found = try_to_load_from_cache(hub_id, name)
        except Exception:  # a malformed repo id is not in any cache
            return False
        if isinstance(found, str) and Path(found).is_file():
            return True
    return False


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


def _open_clip_hub_id(name_and_tag: str) -> str | None:
    """The hub repo open_clip downloads ARCH/TAG from (None when it uses a plain URL)."""
    import open_clip

    arch, _, tag = name_and_tag.partition("/")
    hub = (open_clip.get_pretrained_cfg(arch, tag) or {}).get("hf_hub") or ""
    return hub.rstrip("/") or None


# -- what each built-in component loads --------------------------------------------------------------
def _encoder_file(slot: str, opts: Any, arch: str | None, is_tag: bool, formats: str) -> list[Source]:
    """An encoder whose `pretrained` is a local file/directory, an open_clip tag, or unset (random)."""
    fix = f"set {slot}.options.pretrained to {formats}"
    if not opts.pretrained:
        if "tiny" in (getattr(opts, "variant", None), getattr(opts, "arch", None)):
            return []  # random by design (open-clip's test tower is arch 'tiny')
        return [Source(slot, "weights", "random", None, f"{slot}.options.pretrained", fix)]
    if is_tag and arch is not None:
        return [Source(slot, "weights", "open_clip", f"{arch}/{opts.pretrained}", f"{slot}.options.pretrained", fix)]
    return [Source(slot, "weights", "local", opts.pretrained, f"{slot}.options.pretrained", fix)]


def _eva_vit_g(slot: str, opts: Any, stage: int) -> list[Source]:
    return _encoder_file(slot, opts, None, False, "a vlbridge encoder directory, a transformers BLIP-2 directory or a LAVIS/EVA-CLIP .pth")


def _clip_vit_l(slot: str, opts: Any, stage: int) -> list[Source]:
    from vlbridge.plugins.encoders.open_clip_configs import is_weights_file

    arch = None if opts.variant == "tiny" else ("ViT-L-14-336" if opts.image_size == 336 else "ViT-L-14")
    tag = bool(opts.pretrained) and not is_weights_file(opts.pretrained)
    return _encoder_file(slot, opts, arch, tag, "a local open_clip checkpoint file (or a tag such as 'openai' where the hub is reachable)")


def _open_clip(slot: str, opts: Any, stage: int) -> list[Source]:
    return _encoder_file(slot, opts, opts.arch, opts.tag is not None, "a local open_clip checkpoint file (or a tag where the hub is reachable)")


def _model_source(slot: str, value: str | None, option: str, what: str = "weights", default: bool = False) -> list[Source]:
    """A `model`-style option: a local directory or a hub id (None: nothing to load)."""
    from vlbridge.files.hf_config import looks_local

    if not value:
        return []
    kind: Kind = "local" if looks_local(value) else "hub"
    return [Source(slot, what, kind, value, option, f"set {option} to a local directory written by save_pretrained", default)]


def _hf_vision(slot: str, opts: Any, stage: int) -> list[Source]:
    return _model_source(slot, opts.source, f"{slot}.options.model", default=not opts.model)


def _generic_llm(slot: str, opts: Any, stage: int) -> list[Source]:
    return _model_source(slot, opts.model, f"{slot}.options.model")


def _family_llm(hub_prefix: str) -> Rule:
    def rule(slot: str, opts: Any, stage: int) -> list[Source]:
        if opts.model is None and opts.variant == "tiny":
            return []
        return _model_source(slot, opts.model or f"{hub_prefix}{opts.variant}", f"{slot}.options.model", default=not opts.model)
    return rule


def _qformer(slot: str, opts: Any, stage: int) -> list[Source]:
    """The BERT it starts from, and its tokenizer where building needs text (stage 1, instructions):
    a stage-2 caption or answer never tokenizes Q-Former text, so it is not refused for a missing one."""
    found = _model_source(slot, opts.bert, f"{slot}.options.bert")
    needs_text = stage == 1 or opts.instruction_aware
    if needs_text and (opts.tokenizer or (opts.variant != "tiny" and not opts.bert)):
        from vlbridge.plugins.connectors.qformer_bert import HUB_BERT  # torch: only reached while building

        found += _model_source(slot, opts.tokenizer or HUB_BERT, f"{slot}.options.tokenizer", "tokenizer",
                               default=not opts.tokenizer)
    return found


_RULES: dict[str, Rule] = {
    "eva-vit-g": _eva_vit_g, "clip-vit-l": _clip_vit_l, "open-clip": _open_clip, "hf-vision": _hf_vision,
    "opt": _family_llm("facebook/opt-"), "flan-t5": _family_llm("google/flan-t5-"),
    "hf-causal-lm": _generic_llm, "hf-seq2seq": _generic_llm, "qformer": _qformer,
}
