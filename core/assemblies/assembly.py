"""Assemblies: read a YAML file, a preset name or a dict, validate it against the installed plugins
in one pass (every problem reported together), and produce a Plan. Imports no torch."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from packaging.requirements import InvalidRequirement, Requirement
from pydantic import ConfigDict, Field, ValidationError

from vlbridge.errors import AssemblyError, IncompatibleError, InputFileError, PluginError, UnknownComponentError, WeightsError
from vlbridge.assemblies.declared import connector_counts, connector_output, encoder_declared, llm_declared
from vlbridge.assemblies.plan import ComponentPlan, Plan, split_size
from vlbridge.plugin.registry import Registry, get_registry
from vlbridge.plugin.resources import presets
from vlbridge.plugin.specs import ConnectorSpec, EncoderSpec, Kind, Options, SizeEstimate, Spec
from vlbridge.files.checkpoint_paths import ASSEMBLY_FILE, listed_relative_paths, resolve_relative_paths
from vlbridge.files.userfiles import read_yaml
from vlbridge.files.config_fields import StrictNumbers, did_you_mean

SLOTS: tuple[Kind, ...] = ("encoder", "connector", "llm")


class ComponentRef(StrictNumbers):
    """One slot of an assembly: which registered component, with which options."""

    model_config = ConfigDict(extra="forbid")
    use: str = Field(min_length=1, description="component name, or 'distribution:name' to pick a provider")
    options: dict[str, Any] = Field(default_factory=dict, description="the component's options")


class AssemblyConfig(StrictNumbers):
    """The assembly YAML, structurally (component options are checked against their plugins)."""

    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[1] = 1
    name: str = Field(min_length=1, description="a non-empty name for the model: it names its runs and saved checkpoints")
    description: str = ""
    requires: list[str] = Field(default_factory=list, description="pip requirement strings that must be installed")
    max_text_tokens: int = Field(32, ge=1, description="longest text (prompt + answer) in tokens, for the context check")
    encoder: ComponentRef
    connector: ComponentRef
    llm: ComponentRef | None = Field(None, description="omit for an image-text (stage-1 / retrieval) model without an LLM")


@dataclass(frozen=True)
class Resolved:
    spec: Spec
    options: Options


@dataclass(frozen=True)
class Assembly:
    """A validated assembly: its config, the resolved specs with their options, and its plan."""

    config: AssemblyConfig
    encoder: Resolved
    connector: Resolved
    llm: Resolved | None
    plan: Plan
    source: str

    @property
    def name(self) -> str:
        return self.config.name

    def stage_problem(self, stage: int) -> str | None:
        """Why `stage` cannot be built from this assembly (None when it can)."""
        if stage in self.plan.stages:
            return None
        declared = list(self.connector.spec.stages)
        if stage == 2 and 2 in declared and self.llm is None:
            return (f"stage 2 needs an LLM, and assembly {self.name!r} has no llm: slot (without one it builds for stage 1: "
                    "training, retrieval and features); add an llm: to build stage 2")
        return f"connector {self.plan.connector.name!r} supports stages {declared}, not stage {stage}"


# -- reading ------------------------------------------------------------------------------------
def read_source(source: str | Path | dict[str, Any]) -> tuple[str, Any]:
    """Return (label, raw data) for a dict, a YAML path or a preset name."""
    if isinstance(source, dict):
        return f"'{source.get('name', '<dict>')}'", source
    text = str(source)
    if not text.strip():  # Path('') is the working directory: "' ' is a directory" said nothing useful
        raise AssemblyError(repr(text), ["the assembly is an empty name; give an assembly YAML file or a preset name (vlbridge presets)"])
    path = Path(text).expanduser()
    known = presets()
    if path.is_file():
        try:
            raw = read_yaml(path, "assembly file")
            if path.name == ASSEMBLY_FILE and (listed := listed_relative_paths(path.parent)):
                raw = resolve_relative_paths(raw, path.parent, listed)  # a checkpoint's own: paths relative to it
            return str(path), raw
        except InputFileError as exc:
            raise AssemblyError(str(path), [exc.problem]) from None
        except WeightsError as exc:
            raise AssemblyError(str(path), [str(exc)]) from None
    if path.is_dir():
        raise AssemblyError(text, [f"{text} is a directory; give an assembly YAML file or a preset name"])
    if text in known:
        return f"preset '{text}'", known[text]
    if text.endswith((".yaml", ".yml")) or "/" in text:
        raise AssemblyError(text, [f"file not found: {text}"])
    close = difflib.get_close_matches(text, list(known), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise AssemblyError(repr(text), [f"no assembly file or preset named {text!r}.{hint} Presets: {', '.join(sorted(known))}"])


def _pydantic_problems(exc: ValidationError, prefix: str, valid_fields: list[str] | None = None) -> list[str]:
    problems = []
    for err in exc.errors():
        path = ".".join([prefix, *map(str, err["loc"])]) if prefix else ".".join(map(str, err["loc"]))
        if err["type"] == "extra_forbidden" and valid_fields is not None:
            msg = f"unknown option; valid options are: {', '.join(valid_fields)}{did_you_mean(err['loc'][-1], valid_fields)}"
        elif err["type"] == "extra_forbidden":
            msg = "unknown key"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if "input" in err and err["type"] not in ("missing", "value_error"):
                msg += f" (got {err['input']!r})"
            described = AssemblyConfig.model_fields.get(str(err["loc"][0])) if not prefix and len(err["loc"]) == 1 else None
            if err["type"] == "missing" and described is not None and described.description:
                msg += f": {described.description}"
        problems.append(f"{path or '<top>'}: {msg}")
    return problems


def check_requirements(requires: list[str]) -> list[str]:
    """Each missing or wrong-version requirement, with the pip command that would fix it."""
    problems, missing = [], []
    for i, text in enumerate(requires):
        try:
            req = Requirement(text)
        except InvalidRequirement as exc:
            problems.append(f"requires.{i}: {text!r} is not a valid pip requirement ({exc})")
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(text)
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"requires.{i}: {req.name} {version} is installed but {text!r} is required; run: pip install '{text}'")
    if missing:
        problems.append(f"requires: not installed: {', '.join(missing)}; run: pip install {' '.join(repr(m) for m in missing)}")
    return problems


# -- validation ---------------------------------------------------------------------------------
def _resolve_slot(registry: Registry, kind: Kind, ref: ComponentRef, problems: list[str], warnings: list[str]) -> Resolved | None:
    try:
        resolution = registry.resolve(kind, ref.use)
    except UnknownComponentError as exc:
        problems.append(f"{kind}.use: {exc}")
        return None
    if resolution.warning:
        warnings.append(resolution.warning)
    spec = resolution.spec
    try:
        options = spec.options.model_validate(ref.options)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, f"{kind}.options", list(spec.options.model_fields)))
        return None
    return Resolved(spec, options)


def _component_plan(kind: str, ref: ComponentRef, r: Resolved, size: int | SizeEstimate | None) -> ComponentPlan:
    params, exact, note = split_size(size)
    return ComponentPlan(
        kind=kind, name=r.spec.name, use=ref.use, plugin=str(r.spec.plugin), distribution=str(r.spec.distribution),
        factory=r.spec.factory, options=r.options.model_dump(mode="json"), params=params, params_exact=exact, params_note=note,
    )


def _build_plan(config: AssemblyConfig, enc: Resolved, con: Resolved, llm: Resolved | None, problems: list[str], warnings: list[str]) -> Plan | None:
    assert isinstance(enc.spec, EncoderSpec) and isinstance(con.spec, ConnectorSpec)
    label = {k: f"{k} '{r.spec.name}'" for k, r in zip(SLOTS, (enc, con, llm)) if r is not None}
    try:  # the plugins' shape functions are third-party code: a PluginError names the one at fault
        enc_out, preprocess, enc_params = encoder_declared(enc.spec, enc.options)
        dims, llm_params = llm_declared(llm.spec, llm.options) if llm is not None else (None, None)
        con_out = connector_output(con.spec, con.options, enc_out, dims.embed_width) if dims is not None else None
    except PluginError as exc:
        problems.append(str(exc))
        return None
    except IncompatibleError as exc:  # the connector declines this encoder / LLM pair
        problems.append(f"{label['connector']} cannot join {label['encoder']} ({enc_out}) to {label['llm']}: {exc}")
        return None
    stages = tuple(con.spec.stages)
    if dims is None:
        stages = tuple(s for s in stages if s == 1)
        if not stages:
            problems.append(f"{label['connector']} trains only with an LLM (stages {list(con.spec.stages)}); add an llm: slot")
            return None
    else:
        _check_llm_joint(config, label, con_out, dims, problems, warnings)
    llm_width = dims.embed_width if dims is not None else 0
    try:
        counts, stored = connector_counts(con.spec, con.options, enc_out, llm_width, config.max_text_tokens)
    except PluginError as exc:
        problems.append(str(exc))
        return None
    trainable = {s: n for s, n in counts.items() if s in stages}
    return Plan(
        name=config.name,
        encoder=_component_plan("encoder", config.encoder, enc, enc_params),
        connector=_component_plan("connector", config.connector, con, trainable.get(max(stages))),
        llm=_component_plan("llm", config.llm, llm, llm_params) if llm else None,
        preprocess=preprocess, encoder_out=enc_out, connector_out=con_out, llm_dims=dims,
        max_text_tokens=config.max_text_tokens, stages=stages, trainable_params=trainable,
        connector_activations={s: n for s, n in stored.items() if s in stages}, warnings=tuple(warnings),
    )


def _check_llm_joint(config: AssemblyConfig, label: dict[str, str], con_out, dims, problems: list[str], warnings: list[str]) -> None:
    if con_out.width != dims.embed_width:
        problems.append(f"width mismatch: {label['connector']} outputs {con_out.width}-wide tokens but {label['llm']} embeds tokens at {dims.embed_width}")
    total = con_out.num_tokens + config.max_text_tokens
    if total > dims.context_length:
        msg = (f"too many tokens: {label['connector']} feeds {con_out.num_tokens} visual tokens + max_text_tokens "
               f"{config.max_text_tokens} = {total}, beyond {label['llm']}'s context of {dims.context_length}")
        if dims.context_is_hard:
            problems.append(msg)
        else:
            warnings.append(msg + " (allowed: its positions are relative, but quality may suffer)")


def load_assembly(source: str | Path | dict[str, Any], registry: Registry | None = None) -> Assembly:
    """Read and validate an assembly (YAML path, preset name or dict); raise AssemblyError listing
    every problem, or return the Assembly with its Plan. No weights are touched, no torch imported."""
    label, raw = read_source(source)
    if not isinstance(raw, dict):
        raise AssemblyError(label, [f"an assembly must be a YAML mapping with name, encoder, connector and llm; got {type(raw).__name__}"])
    registry = registry or get_registry()
    problems: list[str] = []
    warnings: list[str] = []
    try:
        config: AssemblyConfig | None = AssemblyConfig.model_validate(raw)
    except ValidationError as exc:
        config = None
        problems.extend(p for p in _pydantic_problems(exc, "") if not p.startswith(SLOTS))
    resolved: dict[Kind, Resolved | None] = {}
    for kind in SLOTS:
        if kind == "llm" and raw.get("llm") is None:
            resolved["llm"] = None  # an LLM-free assembly: stage 1, features and retrieval only
            continue
        if kind not in raw:
            problems.append(f"{kind}: missing; give {{use: NAME, options: {{...}}}} (installed: {', '.join(registry.names(kind))})")
            continue
        try:
            ref = ComponentRef.model_validate(raw[kind])
        except ValidationError as exc:
            problems.extend(_pydantic_problems(exc, kind))
            continue
        resolved[kind] = _resolve_slot(registry, kind, ref, problems, warnings)
    problems.extend(check_requirements(raw.get("requires") or []) if isinstance(raw.get("requires"), list) else [])
    plan = None
    llm_ready = "llm" in resolved and (resolved["llm"] is not None or raw.get("llm") is None)  # None: failed, or no LLM asked for
    if config is not None and resolved.get("encoder") and resolved.get("connector") and llm_ready:
        plan = _build_plan(config, resolved["encoder"], resolved["connector"], resolved["llm"], problems, warnings)
    if problems or plan is None or config is None:
        raise AssemblyError(label, problems or ["invalid assembly"])
    return Assembly(config, resolved["encoder"], resolved["connector"], resolved["llm"], plan, label)
