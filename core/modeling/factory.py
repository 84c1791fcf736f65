"""`vlbridge.build` (this module is vlbridge.modeling.factory): the one constructor. A short pipeline of named steps: validate the assembly,
build each part from its spec's factory, check the real shapes against the plan, compose, and load
connector weights if given."""

from __future__ import annotations

import fnmatch
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from vlbridge.assemblies.assembly import Assembly, load_assembly
from vlbridge.files.checkpoint_paths import ASSEMBLY_FILE
from vlbridge.files.userfiles import read_yaml
from vlbridge.files.checkpoint import (META_FILE, TRAINED_STAGES, WEIGHTS_FILE, checkpoint_assembly, listed_absent, listed_trained_stages,
                                       read_connector_weights, read_meta)
from vlbridge.modeling.connector_protocol import Absence, set_absent, stages_training, trainable_names
from vlbridge.plugin.contract import build_component, check_llm, check_tokens, describe, plugin_call
from vlbridge.files.weights import StateDict, load_subset
from vlbridge.errors import AssemblyWarning, PluginWarning, UntrainedWarning, VLBridgeError, WeightsError
from vlbridge.modeling.model import VLBridgeModel
from vlbridge.parts.hf_quiet import quiet_hf
from vlbridge.parts.devices import resolve_device
from vlbridge.assemblies.reachability import check_reachable

_Built = TypeVar("_Built")
FROZEN_INIT_SEED = 0  # frozen parts without pretrained weights: the same random part on every build
INIT_SEED = 0  # the connector's, unless build(init_seed=...) says otherwise (the trainer passes its seed)


@quiet_hf()  # transformers' load bars are not vlbridge's output; the caller's settings come back
def build(assembly: Assembly | str | Path | dict[str, Any], *, stage: int | None = None, weights: str | Path | None = None,
          device: str | torch.device | None = None, check_shapes: bool = True, random_weights: bool = False,
          init_seed: int = INIT_SEED) -> VLBridgeModel:
    """Build the model an assembly describes.

    :param assembly: an Assembly, a YAML path, a preset name or a dict.
    :param stage: 1 (encoder + connector, no LLM) or 2 (all three); default: the connector's last stage.
    :param weights: connector weights: a vlbridge checkpoint directory (with the encoder tensors and LoRA
        adapters its run fine-tuned, if any), a training run's output_dir (its latest checkpoint, as
        `vlbridge.load` and `--weights` take it) or a safetensors file. A checkpoint of an earlier
        stage than `stage` warns (UntrainedWarning) where its tensors miss that stage's training.
    :param device: where to put the model (default CPU).
    :param check_shapes: run one dummy image through encoder and connector and compare with the plan.
    :param random_weights: allow a real-size frozen part without pretrained weights (random on
        purpose, e.g. for benchmarks); without it that is refused before anything is built.
    :param init_seed: seeds the connector's random initialisation (before any weights load), so the
        same assembly builds the same model every time; the caller's random state is left untouched.
        Frozen parts without pretrained weights always use FROZEN_INIT_SEED instead.
    """
    if not isinstance(assembly, Assembly):
        assembly = load_assembly(assembly)
    plan = assembly.plan
    for message in plan.warnings:  # validate's plan lists them; `vlbridge train`, caption and load said nothing
        warnings.warn(f"assembly {plan.name}: {message}", AssemblyWarning, stacklevel=2)
    stage = max(plan.stages) if stage is None else stage
    problem = assembly.stage_problem(stage)
    if problem:
        raise VLBridgeError(problem)
    check_reachable(assembly, stage, random_weights=random_weights)  # every part's weights, before anything loads
    if isinstance(device, str):
        device = resolve_device(device, option="device")  # a missing CUDA is a user error, found before building
    encoder = _build_frozen(assembly.encoder)
    llm_width = plan.llm_dims.embed_width if plan.llm_dims is not None else 0  # 0: an LLM-free (stage-1) assembly
    connector = seeded(init_seed, build_component, assembly.connector.spec, assembly.connector.options, plan.encoder_out, llm_width)
    llm = _build_frozen(assembly.llm) if stage == 2 and assembly.llm is not None else None
    if llm is not None:
        check_llm(llm, plan.llm_dims, describe(plan.llm))
    model = VLBridgeModel(assembly, encoder, connector, llm, stage)
    _check_declared_count(model, stage)
    if device is not None:
        model.to(device)
    if check_shapes:
        check_real_shapes(model)
    if weights is not None:
        if Path(weights).is_dir() and not (Path(weights) / META_FILE).is_file():
            from vlbridge.files.checkpoint_source import resolve_checkpoint

            weights = resolve_checkpoint(weights, "weights=").directory  # a run's output_dir: its latest step
        load_connector_weights(model, weights)
        if Path(weights).is_dir():
            if _restore_tuned(model, Path(weights)) and device is not None:
                model.to(device)  # the adapters were injected after the move
            _warn_trained_later(model, Path(weights))
    return model.eval()  # like transformers' from_pretrained: call .train() to train


def _restore_tuned(model: VLBridgeModel, directory: Path) -> list[str]:
    """A checkpoint directory given as weights brings what its run fine-tuned too (encoder tensors,
    LoRA adapters): its connector was trained against them, and without them it computes otherwise."""
    from vlbridge.finetune.tuning import restore_tuned

    return restore_tuned(model, directory, read_meta(directory))


def _check_declared_count(model: VLBridgeModel, stage: int) -> None:
    """Warn where the connector trains another number of parameters than its spec's num_params says:
    validate's plan and memory estimate state the declared one."""
    declared = model.plan.trainable_params.get(stage)
    trained = sum(p.numel() for p in model.connector.parameters() if p.requires_grad)
    if declared is not None and declared != trained:
        warnings.warn(f"{describe(model.plan.connector)}: num_params() declares {declared:,} trainable parameters in stage {stage} "
                      f"but the module trains {trained:,}; validate's plan and memory estimate use the declared number "
                      "(check_plugin reports this as an error)", PluginWarning, stacklevel=3)


def seeded(seed: int, make: Callable[..., _Built], *args: Any) -> _Built:
    """`make(*args)` with the CPU generator seeded, so its random init is a function of `seed`; the
    caller's generator state comes back afterwards. Parts are built on the CPU, and only its
    generator is seeded: torch.manual_seed would also reseed (and move) the caller's CUDA generators."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return make(*args)


def _build_frozen(part) -> torch.nn.Module:
    """Build a frozen part under a fixed seed: one without pretrained weights is random but the same
    on every build, so a connector trained against it still fits when the checkpoint is reloaded.
    Gradients are turned off here, so a plugin's plain nn.Module is frozen too (a FrozenPart also
    stays in eval mode when the model trains)."""
    module = seeded(FROZEN_INIT_SEED, build_component, part.spec, part.options)
    return module.requires_grad_(False).eval()


def check_real_shapes(model: VLBridgeModel) -> None:
    """Push one blank image through the encoder and two copies of its tokens through the connector:
    a spec that lies, or a forward that fails or loses the batch, is caught here, naming the plugin."""
    check_connector_tokens(model, check_encoder_tokens(model))


def check_encoder_tokens(model: VLBridgeModel) -> torch.Tensor:
    """The encoder's tokens for one blank image, held to the plan's (N, D); returns them (fp32)."""
    plan = model.plan
    size = plan.preprocess.image_size
    pixels = torch.zeros(1, 3, size, size, device=model.device)
    encoder = describe(plan.encoder)
    with torch.no_grad():
        image_embeds = plugin_call(encoder, f"forward on a blank {tuple(pixels.shape)} image", model.encoder, pixels)
    return check_tokens(encoder, plan.encoder_out, image_embeds, batch=1).float()


def check_connector_tokens(model: VLBridgeModel, image_embeds: torch.Tensor) -> None:
    """Two copies of one image's encoder tokens through the connector, its visual tokens held to the
    plan's (M, the LLM's embedding width); nothing to check for an LLM-free (stage-1) assembly."""
    plan = model.plan
    if plan.connector_out is None:
        return  # no LLM joint to check
    connector = describe(plan.connector)
    pair = image_embeds.repeat(2, 1, 1)
    was_training = model.connector.training
    model.connector.eval()
    try:
        with torch.no_grad():
            tokens = plugin_call(connector, f"forward on image tokens of shape {tuple(pair.shape)}", model.visual_tokens,
                                 image_embeds=pair)
    finally:
        model.connector.train(was_training)
    check_tokens(connector, plan.connector_out, tokens, batch=2)


def load_connector_weights(model: VLBridgeModel, weights: str | Path, *, shapes_only: bool = False) -> list[str]:
    """Load a vlbridge checkpoint (directory or connector.safetensors) into the connector, strictly
    for the parameters of the stage it was saved in except those its manifest lists as absent or
    `allow_missing` excuses. Whatever the file lacks is marked absent (what needs it refuses to
    run, vlbridge.modeling.connector_protocol); returns those names. `shapes_only` (a model built on
    the meta device): the same checks from the safetensors header, no tensor data read. The model
    takes the stages the checkpoint's tensors went through (`model.trained_stages`; none known for a
    bare file), so what it saves carries them forward."""
    path, source = Path(weights), str(weights)
    allow_missing: list[str] = []
    absent: list[str] = []
    recorded = None
    lineage: tuple[int, ...] = ()
    if path.is_dir():
        meta = read_meta(path)
        stage, allow_missing, absent = int(meta["stage"]), list(meta.get("allow_missing", [])), listed_absent(meta, path)
        recorded = meta.get("tensors")
        lineage = listed_trained_stages(meta, path) or (stage,)  # an older checkpoint: its own stage is all that is known
        if stage == 2 and model.stage == 2:
            _check_instruction_reading(model, path)
        path = path / WEIGHTS_FILE
    else:
        stage = model.stage
    tensors = read_connector_weights(path, shapes_only=shapes_only)
    _check_tensor_count(model, tensors, recorded, set(absent), path)
    contradicted = sorted(set(absent) & set(tensors))
    if contradicted:
        raise WeightsError(f"{source}: checkpoint.json lists {', '.join(contradicted)} as absent, but {path.name} holds it; "
                           "the two files do not belong together (save the model again)")
    who = describe(model.plan.connector)
    trained = trainable_names(model.connector, stage, model.stage, who)
    expected = {n for n in trained - set(absent) if not any(fnmatch.fnmatchcase(n, pattern) for pattern in allow_missing)}
    fitting = _without_untrained_misfits(model, tensors, trained)
    own = model.connector.state_dict()
    misfits = {name: f"{tuple(tensors[name].shape)} in the file, {tuple(own[name].shape)} here" for name in set(tensors) - set(fitting)}
    left = load_subset(model.connector, fitting, str(path), expected)
    stages = stages_training(model.connector, left, model.plan.stages, model.stage, who)
    set_absent(model.connector, {name: Absence(source, stages[name], misfits.get(name, "")) for name in left}, who)
    model.trained_stages = lineage
    return left


def _check_tensor_count(model: VLBridgeModel, tensors: StateDict, recorded: Any, absent: set[str], path: Path) -> None:
    """Refuse a connector file holding another number of tensors than checkpoint.json records for it
    (`recorded`; an older checkpoint without the count is not checked). A tensor lost from the file
    was otherwise read as one the saved model lacked: loaded without a word, refused only when used,
    as if an older vlbridge had saved it."""
    if not isinstance(recorded, int) or isinstance(recorded, bool) or recorded == len(tensors):
        return
    own = set(model.connector.state_dict())
    if len(tensors) < recorded:
        lost = sorted(own - set(tensors) - absent)
        named = f"; of this connector's tensors it lacks {', '.join(lost[:8])}{', ...' if len(lost) > 8 else ''}" if lost else ""
        change = f"has lost {recorded - len(tensors)}{named}"
    else:
        added = sorted(set(tensors) - own)
        named = f" ({', '.join(added[:8])}{', ...' if len(added) > 8 else ''})" if added else ""
        change = f"has {len(tensors) - recorded} more{named}"
    raise WeightsError(f"{path} holds {len(tensors)} tensors where {path.parent / META_FILE} records {recorded}: the file {change}, "
                       "so it is not the one saved with that checkpoint.json (damaged or edited); save the model again, or "
                       "copy the checkpoint folder whole")


def _check_instruction_reading(model: VLBridgeModel, directory: Path) -> None:
    """Refuse a stage-2 checkpoint whose connector read instructions (InstructBLIP) for a model whose
    connector reads none: the tensors fit, but its queries would be computed from other inputs than
    those they were trained on. The other way (a BLIP-2 start for InstructBLIP) is how InstructBLIP begins."""
    if not (directory / ASSEMBLY_FILE).is_file():  # a connector-only directory says nothing about what it read
        return
    saved = read_yaml(directory / ASSEMBLY_FILE, "checkpoint assembly") or {}
    options = ((saved.get("connector") or {}).get("options") or {}) if isinstance(saved, dict) else {}
    if options.get("instruction_aware") is True and not getattr(model.connector, "instruction_aware", False):
        raise WeightsError(f"{directory}: its connector was trained in stage 2 reading each image's instruction "
                           f"(instruction_aware: true), and this assembly's {describe(model.plan.connector)} reads none, "
                           "so its visual tokens would differ from those it learnt; set the connector option "
                           "instruction_aware: true (or load the checkpoint with its own assembly)")


def _without_untrained_misfits(model: VLBridgeModel, tensors: StateDict, trained: set[str]) -> StateDict:
    """Drop the tensors the checkpoint's own stage never trained whose shape differs from this model's.

    A stage-1 checkpoint carries the connector's projection into its assembly's LLM as built (seeded,
    never trained: stage 1 has no LLM). A stage-2 run that starts from it with another LLM (the demo's
    --llm flan-t5 from the OPT-assembly stage-1 Q-Formers, BLIP-2's own FlanT5 rows from its pretrain
    checkpoint) needs a projection of another width, trained from its own init; a tensor the
    checkpoint's stage did train must still match exactly (load_subset says so)."""
    own = model.connector.state_dict()
    return {name: tensor for name, tensor in tensors.items()
            if name in trained or name not in own or tuple(tensor.shape) == tuple(own[name].shape)}


@quiet_hf()  # transformers' load bars are not vlbridge's output; the caller's settings come back
def load(checkpoint_dir: str | Path, *, stage: int | None = None, device: str | torch.device | None = None,
         random_weights: bool = False) -> VLBridgeModel:
    """Rebuild a model saved with `model.save(dir)`: the frozen parts from their sources, the
    connector from the checkpoint, and what fine-tuning changed (encoder tensors, LoRA adapters) too.
    A training run's output_dir loads its latest checkpoint, as `--checkpoint` does on the CLI.
    `stage` defaults to the checkpoint's own: a stage-1 checkpoint loads without an LLM (its
    projection into one was never trained), so captioning from it is refused rather than run on
    random weights; pass stage=2 to build the LLM side anyway (as a stage-2 run starting from it does)."""
    from vlbridge.files.checkpoint_source import resolve_checkpoint

    directory = resolve_checkpoint(checkpoint_dir, "vlbridge.load:").directory
    stage = int(read_meta(directory)["stage"]) if stage is None else stage
    return build(checkpoint_assembly(directory), stage=stage, weights=directory, device=device, random_weights=random_weights)


def _warn_trained_later(model: VLBridgeModel, directory: Path) -> None:
    """A checkpoint directory's connector loaded for a later stage than its own holds the tensors only
    that later stage trains as they were built, unless its run started from a checkpoint that had been
    through that stage (`model.trained_stages`, from checkpoint.json): say so, since what uses them
    (captioning, for a stage-1 checkpoint) runs without an error on values nothing trained. An older
    checkpoint does not record where its run started, so the warning says it may be wrong. `build`
    calls this for every directory it loads (`load`, `--assembly A --weights DIR`); a training run
    does not hear it, since it trains them. A bare weights file records no stage (its tensors load
    as the model's own stage's), so nothing is known to warn about."""
    meta = read_meta(directory)
    saved = int(meta["stage"])
    if model.stage <= saved:
        return
    who = describe(model.plan.connector)
    trained = set().union(*(trainable_names(model.connector, s, model.stage, who) for s in model.trained_stages))
    later = sorted(trainable_names(model.connector, model.stage, model.stage, who) - trained)
    if later:
        shown = ", ".join(later[:4]) + (", ..." if len(later) > 4 else "")
        unless = "" if TRAINED_STAGES in meta else \
            f" (unless its run started from a stage-{model.stage} checkpoint: it is older than the record of that)"
        warnings.warn(f"{directory} is a stage-{saved} checkpoint loaded for stage {model.stage}: {shown} train only in stage "
                      f"{model.stage}, so they hold the values they were built with{unless}, and what reads them (captions, "
                      f"answers) is untrained until a stage-{model.stage} run trains them (vlbridge train with stage: "
                      f"{model.stage} and init_from: {directory})", UntrainedWarning, stacklevel=_callers_level())


def _callers_level() -> int:
    """warnings' stacklevel for the first frame outside this module and contextlib (the quiet_hf
    wrapper round build and load), counted from the function that calls this: the line of the
    caller's that asked for the model, whether it called build or load."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__") in (__name__, "contextlib"):
        frame, level = frame.f_back, level + 1
    return level
