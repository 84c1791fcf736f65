"""The training config (`vlbridge train CONFIG.yaml`): one pydantic model, validated before anything
loads. Imports no torch.

Two passes, each reporting every problem it finds with its YAML path: `TrainConfig` checks the
structure (unknown keys, types, ranges), then `check_config` checks what spans fields or needs the
assembly (steps xor epochs, stage 2 needs an LLM, a prompt only in stage 2, fp16 needs CUDA...).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vlbridge.assemblies.assembly import Assembly, load_assembly
from vlbridge.data.config import DataConfig
from vlbridge.errors import AssemblyError, InputFileError, VLBridgeError
from vlbridge.assemblies.reachability import reachability_problems
from vlbridge.train.finetune_config import FinetuneConfig, finetune_problems
from vlbridge.files.checkpoint_paths import META_FILE, RUN_CHECKPOINTS
from vlbridge.files.config_fields import MAX_SEED, PathText, StrictNumbers, did_you_mean, listed_once, unusable_path
from vlbridge.files.userfiles import read_yaml

Precision = Literal["fp32", "bf16", "fp16"]
_YAML_PATH = re.compile(r"^[\w-]+(\.[\w-]+)*:")  # an assembly problem that starts with its own path


class TrainConfigError(VLBridgeError):
    """A training config that cannot run; lists every problem, each with its YAML path."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, list(problems)
        listed = "\n".join(f"  - {p}" for p in self.problems)
        count = len(self.problems)
        super().__init__(f"training config {source} is invalid ({count} problem{'s' if count != 1 else ''}):\n{listed}")


class Section(StrictNumbers):
    model_config = ConfigDict(extra="forbid")


class DataSection(Section):
    """What the connector trains and is evaluated on."""

    train: DataConfig = Field(description="the training data (see vlbridge.data.DataConfig)")
    eval: DataConfig | None = Field(None, description="validation data: its mean loss is logged every eval_every steps and at the end")
    features: PathText | None = Field(None, description="a frozen-feature cache to train from instead of images (null: run the encoder)")


class OptimizerConfig(Section):
    """AdamW; biases, norms and other 1-D parameters get no weight decay (BLIP-2's groups)."""

    lr: float = Field(1e-4, gt=0, description="peak learning rate, reached at the end of warm-up (BLIP-2: 1e-4)")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas (BLIP-2 paper: 0.9, 0.98; LAVIS yaml: 0.9, 0.999)")
    weight_decay: float = Field(0.05, ge=0, description="decoupled weight decay on matrices and embeddings (BLIP-2: 0.05)")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    lr_scales: dict[str, float] = Field(default_factory=dict, description=(
        "peak-lr multipliers by trainable parameter name prefix, e.g. {connector.layers: 0.1} trains the Q-Former body "
        "at a tenth of lr while its projection keeps lr (a stage-1 start kept, not overwritten); the longest prefix wins"))

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"each beta must be in [0, 1), got {list(betas)}")
        return betas

    @field_validator("lr_scales")
    @classmethod
    def _scales_positive(cls, scales: dict[str, float]) -> dict[str, float]:
        bad = {prefix: scale for prefix, scale in scales.items() if not scale > 0}
        if bad:
            raise ValueError(f"each lr scale must be above 0 (a frozen part is frozen by the stage, not by lr), got {bad}")
        return scales


class ScheduleConfig(Section):
    """Learning rate per optimizer step: linear warm-up from warmup_lr to lr, then cosine to min_lr."""

    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warm-up (BLIP-2: 2000 / 5000)")
    warmup_lr: float = Field(0.0, ge=0, description="learning rate the warm-up starts from (LAVIS: 1e-6)")
    min_lr: float = Field(0.0, ge=0, description="learning rate the cosine decay ends at (LAVIS: 1e-5)")


class ParallelConfig(Section):
    """How several processes share the work (torchrun). ddp: every rank holds the whole model and
    gradients are all-reduced; fsdp: the frozen parts named in `shard` are split over the ranks per
    transformer block (FSDP2), so a 7B LLM need not fit one GPU next to the rest."""

    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp (default): a whole model per rank; fsdp: shard the frozen parts in `shard`")
    shard: list[Literal["llm", "encoder"]] | None = Field(None, description=(
        "fsdp: the frozen parts to split over the ranks, block by block (null: every one the stage builds; "
        "what trains stays whole on every rank)"))
    reshard_after_forward: bool = Field(True, description=(
        "fsdp: free a block's gathered weights after its forward pass (less memory; gathered again for the backward)"))
    activation_checkpointing: bool = Field(False, description=(
        "recompute the frozen LLM's block activations in the backward pass (stage 2 backpropagates through them)"))

    @field_validator("shard")
    @classmethod
    def _distinct(cls, shard: list[str] | None) -> list[str] | None:
        return listed_once(shard, "part")

    def parts(self, stage: int) -> list[str]:
        """The parts fsdp shards in this stage (stage 1 builds no LLM)."""
        if self.strategy != "fsdp":
            return []
        return list(self.shard) if self.shard is not None else (["llm", "encoder"] if stage == 2 else ["encoder"])


class TrainConfig(Section):
    """One training run: which model, which stage, which data, how to optimise, where to write.
    Relative paths (assembly, data, init_from, output_dir) are taken from the working directory."""

    assembly: Any = Field(description="the model: a preset name, an assembly YAML path, or an inline assembly mapping")
    stage: Literal[1, 2] = Field(description="1: representation learning (ITC, ITM, ITG); 2: generative learning through the frozen LLM")
    init_from: PathText | None = Field(None, description="connector weights to start from: a checkpoint dir or a run's output_dir (null: from scratch)")
    data: DataSection
    batch_size: int = Field(ge=1, description="samples per process per forward pass")
    grad_accum: int = Field(1, ge=1, description="forward passes per optimizer step (global batch = batch_size x grad_accum x processes)")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    grad_clip: float | None = Field(None, gt=0, description="clip the global gradient norm to this (null: no clipping, as BLIP-2)")
    precision: Precision = Field("fp32", description="autocast dtype of the forward pass: fp32, bf16 or fp16 (fp16: CUDA only, with a GradScaler)")
    device: str = Field("auto", description="auto (CUDA when available, else CPU), cpu, or cuda")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seeds python, numpy and torch; the data order is a function of (seed, epoch)")
    steps: int | None = Field(None, ge=1, description="optimizer steps to train (give steps or epochs)")
    epochs: int | None = Field(None, ge=1, description="passes over data.train (give steps or epochs)")
    log_every: int = Field(10, ge=1, description="optimizer steps between metrics lines")
    eval_every: int | None = Field(None, ge=1, description="optimizer steps between evaluations (null: only at the end)")
    save_every: int | None = Field(None, ge=1, description="optimizer steps between checkpoints (null: only at the end)")
    keep_last: int | None = Field(None, ge=1, description="keep only this many newest checkpoints (null: keep all)")
    output_dir: PathText = Field(min_length=1, description="checkpoints/, metrics.jsonl and tensorboard/ go here")
    prompt: str | None = Field(None, description="stage 2: text put before every caption; its tokens are not trained on")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description=(
        "what trains besides the connector: finetune.encoder (unfreeze all or the last N blocks, lr, layer_decay, "
        "grad_checkpointing) and finetune.lora (LoRA on the LLM: r, alpha, dropout, target_modules, lr); see docs/fine-tuning.md"))
    objective: dict[str, Any] = Field(default_factory=dict, description=(
        "options of the stage's objective: stage 1 max_text_tokens, label_smoothing, temp_range; stage 2 max_text_tokens"))
    max_nonfinite: int = Field(10, ge=1, description=(
        "stop after this many non-finite losses in a row, or this many steps in a row whose whole batch kept no target "
        "token (each one skips its step)"))
    drop_last: bool = Field(True, description="drop the last incomplete batch of each epoch (as LAVIS)")
    find_unused_parameters: bool = Field(False, description="DDP: set when some trainable parameters get no gradient (e.g. a loss turned off)")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description=(
        "several processes: strategy ddp (default) or fsdp (shard the frozen LLM / encoder per block), "
        "reshard_after_forward, activation_checkpointing of the LLM's blocks"))
    tensorboard: bool = Field(True, description="also write TensorBoard events when torch.utils.tensorboard imports")
    random_weights: bool = Field(False, description=(
        "allow real-size frozen parts without pretrained weights (random on purpose, e.g. to time training); "
        "otherwise such an assembly is refused before anything loads"))

    @field_validator("assembly")
    @classmethod
    def _assembly_source(cls, value: Any) -> Any:
        if not isinstance(value, (str, dict)) or value == "":
            raise ValueError(f"give a preset name, an assembly YAML path or an inline mapping, got {value!r}")
        if isinstance(value, str) and (problem := unusable_path(value)):
            raise ValueError(problem)
        return value


# -- reading and checking ---------------------------------------------------------------------------
def read_config(source: str | Path | dict[str, Any] | TrainConfig) -> tuple[TrainConfig, str]:
    """Parse and structurally validate a config (YAML path or mapping); returns it and its label."""
    if isinstance(source, TrainConfig):
        return source, "<TrainConfig>"
    label, raw = _read_raw(source)
    if not isinstance(raw, dict):
        raise TrainConfigError(label, [f"<top>: expected a mapping of settings, got {type(raw).__name__}"])
    try:
        return TrainConfig.model_validate(raw), label
    except ValidationError as exc:
        raise TrainConfigError(label, pydantic_problems(exc)) from None


def _read_raw(source: str | Path | dict[str, Any]) -> tuple[str, Any]:
    if isinstance(source, dict):
        return "<dict>", source
    path = Path(source).expanduser()
    if not path.exists():
        raise TrainConfigError(str(source), [f"file not found: {source}"])
    try:
        return str(path), read_yaml(path, "training config")
    except InputFileError as exc:
        raise TrainConfigError(str(path), [exc.problem]) from None


def pydantic_problems(exc: ValidationError, root: type[BaseModel] | None = None) -> list[str]:
    """One 'yaml.path: what is wrong' line per error; a DataConfig's cross-field lines keep their field."""
    problems = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            fields = _fields_at(err["loc"][:-1], root or TrainConfig)
            problems.append(f"{loc}: unknown key; valid keys are: {', '.join(fields)}{did_you_mean(err['loc'][-1], fields)}")
        elif err["type"] == "value_error" and err["loc"] and _model_at(err["loc"], root or TrainConfig):
            # a section's cross-field check (DataConfig.conflicts): one "field: why" per line
            problems.extend(f"{loc}.{line}" for line in message.splitlines())
        else:
            got = f" (got {err['input']!r})" if err["type"] not in ("missing", "value_error") and "input" in err else ""
            problems.append(f"{loc or '<top>'}: {message}{got}")
    return problems


def _model_at(loc: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    """The config model class at a YAML path (None when the path leads to a plain value)."""
    model: Any = root
    for part in loc:
        if isinstance(part, int):  # an item of a list of sections (compare's evals.0): the item's model is the list's
            continue
        field = model.model_fields.get(str(part)) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        annotation = field.annotation
        candidates = [inner for arg in getattr(annotation, "__args__", (annotation,)) for inner in (arg, *getattr(arg, "__args__", ()))]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _fields_at(loc: tuple[Any, ...], root: type[BaseModel]) -> list[str]:
    model = _model_at(loc, root)
    return list(model.model_fields) if model is not None else []


def check_config(config: TrainConfig, label: str = "<config>", *, device_check: bool = True) -> Assembly:
    """The cross-field and assembly checks, all reported together; returns the validated assembly."""
    problems = _field_problems(config)
    assembly = None
    try:
        assembly = load_assembly(config.assembly)
    except AssemblyError as exc:
        where = "assembly" if isinstance(config.assembly, dict) else f"assembly ({exc.source})"
        problems.extend(f"{where}.{p}" if _YAML_PATH.match(p) else f"{where}: {p}" for p in exc.problems)
    if assembly is not None:
        problems.extend(_assembly_problems(config, assembly))
        problems.extend(reachability_problems(assembly, config.stage, random_weights=config.random_weights))
    problems.extend(objective_problems(config))
    if device_check:
        problems.extend(device_problems(config.device, config.precision))
    if problems:
        raise TrainConfigError(label, problems)
    assert assembly is not None
    return assembly


def _field_problems(config: TrainConfig) -> list[str]:
    problems = []
    if (config.steps is None) == (config.epochs is None):
        problems.append("steps, epochs: give exactly one of them (optimizer steps, or passes over data.train)")
    if config.epochs is not None and config.data.train.format == "webdataset":
        problems.append("epochs: the size of a webdataset is not known in advance; give steps instead")
    if config.steps is not None and config.schedule.warmup_steps >= config.steps:
        problems.append(f"schedule.warmup_steps: {config.schedule.warmup_steps} is not below steps ({config.steps})")
    if config.schedule.min_lr > config.optimizer.lr:
        problems.append(f"schedule.min_lr: {config.schedule.min_lr} is above optimizer.lr ({config.optimizer.lr})")
    if config.schedule.warmup_lr > config.optimizer.lr:
        problems.append(f"schedule.warmup_lr: {config.schedule.warmup_lr} is above optimizer.lr ({config.optimizer.lr})")
    if config.prompt is not None and config.stage != 2:
        problems.append("prompt: only used in stage 2 (the stage-1 objective conditions on no prompt)")
    init_from = Path(config.init_from).expanduser() if config.init_from is not None else None
    if init_from is not None and not init_from.is_dir():
        problems.append(f"init_from: {config.init_from!r} is not a directory; give a checkpoint dir or a run's output_dir")
    elif init_from is not None and not ((init_from / META_FILE).is_file() or (init_from / RUN_CHECKPOINTS).is_dir()):
        problems.append(f"init_from: {config.init_from!r} holds no checkpoint (no {META_FILE}, no {RUN_CHECKPOINTS}/); give a "
                        "checkpoint dir or a run's output_dir")  # which step of a run: resolve_checkpoint, when training starts
    output_dir = Path(config.output_dir).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        problems.append(f"output_dir: {config.output_dir!r} is a file; give a folder (new, or a run's to resume)")
    if config.data.features is not None and not Path(config.data.features).expanduser().exists():
        problems.append(f"data.features: {config.data.features!r} does not exist")
    problems.extend(data_file_problems(config.data.train, "data.train"))
    if config.data.eval is not None:
        problems.extend(data_file_problems(config.data.eval, "data.eval"))
    problems.extend(finetune_problems(config.finetune, stage=config.stage, features=config.data.features))
    problems.extend(parallel_problems(config))
    return problems


def parallel_problems(config: TrainConfig) -> list[str]:
    """What the parallel section asks that this stage cannot do."""
    par, problems = config.parallel, []
    if par.strategy != "fsdp":  # ddp keeps a whole model on every rank: a shard list there would be silently ignored
        # a default written out asks for nothing (every saved train.yaml holds them: it must read back)
        asked = [key for key in ("shard", "reshard_after_forward")
                 if key in par.model_fields_set and getattr(par, key) != ParallelConfig.model_fields[key].default]
        problems.extend(f"parallel.{key}: only strategy: fsdp shards; set parallel.strategy: fsdp, or remove {key} (ddp keeps a "
                        "whole model on every rank)" for key in asked)
    if par.strategy == "fsdp" and par.shard == []:
        problems.append("parallel.shard: fsdp needs at least one part to shard (llm, encoder); or use strategy: ddp")
    if par.strategy == "fsdp" and config.stage == 1 and "llm" in (par.shard or []):
        problems.append("parallel.shard: stage 1 builds no LLM; shard [encoder] only")
    if par.activation_checkpointing and config.stage == 1:
        problems.append("parallel.activation_checkpointing: stage 1 runs no LLM; it checkpoints the LLM's blocks in stage 2")
    return problems


def data_file_problems(data: DataConfig, where: str) -> list[str]:
    """Every annotation file, shard and image folder the data section names exists (a run would
    otherwise fail after the model loaded)."""
    from vlbridge.data.shards import expand_shards

    problems = []
    for i, path in enumerate(data.paths):
        if data.format == "webdataset":
            try:
                expand_shards(path)
            except VLBridgeError as exc:
                problems.append(f"{where}.paths[{i}]: {exc}")
        elif not Path(path).expanduser().is_file():
            problems.append(f"{where}.paths[{i}]: {missing_file(path, f'the {data.format} annotation file')}")
    for i, path in enumerate(data.vqa_annotations or []):
        if not Path(path).expanduser().is_file():
            problems.append(f"{where}.vqa_annotations[{i}]: {missing_file(path, 'the VQA annotations JSON')}")
    if data.image_root is not None and not Path(data.image_root).expanduser().is_dir():
        problems.append(f"{where}.image_root: {data.image_root!r} is not a directory")
    return problems


def _assembly_problems(config: TrainConfig, assembly: Assembly) -> list[str]:
    plan, problems = assembly.plan, []
    if config.stage == 2 and assembly.llm is None:
        problems.append("stage: stage 2 trains through the LLM, but the assembly has no llm slot; add one, or set stage: 1")
    elif config.stage not in plan.stages:
        problems.append(f"stage: connector {plan.connector.name!r} trains in stages {list(plan.stages)}, not stage {config.stage}")
    return problems


def objective_problems(config: TrainConfig) -> list[str]:
    """The objective's options, checked by its own pydantic model (imports torch)."""
    from vlbridge.train.objectives import OBJECTIVES

    if "prompt" in config.objective:
        return ["objective.prompt: set the prompt with the top-level prompt: key"]
    options = OBJECTIVES[f"stage{config.stage}"].Options
    try:
        options.model_validate(config.objective)
    except ValidationError as exc:
        return [f"objective.{problem}" for problem in pydantic_problems(exc, options)]
    return []


def device_problems(device: str, precision: str) -> list[str]:
    """The device exists (the rule every command shares, vlbridge.parts.devices) and supports the precision (imports torch)."""
    from vlbridge.parts.devices import DeviceError, resolve_device

    try:
        resolved = resolve_device(device, option="device")
    except DeviceError as exc:
        return [str(exc)]
    if precision == "fp16" and resolved.type != "cuda":
        return ["precision: fp16 needs a CUDA device (its GradScaler is CUDA-only); on CPU use bf16 or fp32"]
    return []


def dump_config(config: TrainConfig) -> str:
    """The config as YAML, as it was validated (defaults filled in)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def missing_file(path: str, expected: str) -> str:
    """Why `path` is not the file expected: a folder where a file goes, or nothing there (named
    against the working directory a relative path is read from)."""
    found = Path(path).expanduser()
    if found.is_dir():
        return f"{path!r} is a folder; give {expected} itself (a file)"
    where = "" if found.is_absolute() else f" (relative paths are read from the working directory, {Path.cwd()})"
    return f"file not found: {path}{where}"
