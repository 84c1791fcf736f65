"""`vlbridge.build` (this module is vlbridge.factory): the one constructor. A short pipeline of named steps: validate the assembly,
build each part from its spec's factory, check the real shapes against the plan, compose, and load
connector weights if given."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import torch

from vlbridge.assembly import Assembly, load_assembly
from vlbridge.checkpoint import ASSEMBLY_FILE, WEIGHTS_FILE, read_connector_weights, read_meta
from vlbridge.weights import load_subset
from vlbridge.errors import VLBridgeError
from vlbridge.model import VLBridgeModel
from vlbridge.specs import TokenShape


def build(assembly: Assembly | str | Path | dict[str, Any], *, stage: int | None = None, weights: str | Path | None = None,
          device: str | torch.device | None = None, check_shapes: bool = True) -> VLBridgeModel:
    """Build the model an assembly describes.

    :param assembly: an Assembly, a YAML path, a preset name or a dict.
    :param stage: 1 (encoder + connector, no LLM) or 2 (all three); default: the connector's last stage.
    :param weights: connector weights: a vlbridge checkpoint directory or a safetensors file.
    :param device: where to put the model (default CPU).
    :param check_shapes: run one dummy image through encoder and connector and compare with the plan.
    """
    if not isinstance(assembly, Assembly):
        assembly = load_assembly(assembly)
    plan = assembly.plan
    stage = max(plan.stages) if stage is None else stage
    if stage not in plan.stages:
        raise VLBridgeError(f"connector {plan.connector.name!r} supports stages {list(plan.stages)}, not stage {stage}")
    encoder = _build_frozen(assembly.encoder)
    llm_width = plan.llm_dims.embed_width if plan.llm_dims is not None else 0  # 0: an LLM-free (stage-1) assembly
    connector = assembly.connector.spec.load_factory()(assembly.connector.options, plan.encoder_out, llm_width)
    llm = _build_frozen(assembly.llm) if stage == 2 and assembly.llm is not None else None
    if llm is not None and llm.embed_width != plan.llm_dims.embed_width:
        raise VLBridgeError(f"llm {plan.llm.name!r} declared embedding width {plan.llm_dims.embed_width} but the built model embeds at {llm.embed_width}")
    model = VLBridgeModel(assembly, encoder, connector, llm, stage)
    if device is not None:
        model.to(device)
    if check_shapes:
        check_real_shapes(model)
    if weights is not None:
        load_connector_weights(model, weights)
    return model.eval()  # like transformers' from_pretrained: call .train() to train


FROZEN_INIT_SEED = 0


def _build_frozen(part) -> torch.nn.Module:
    """Build a frozen part under a fixed seed: one without pretrained weights is random but the same
    on every build, so a connector trained against it still fits when the checkpoint is reloaded.
    The caller's random state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FROZEN_INIT_SEED)
        return part.spec.load_factory()(part.options)


def check_real_shapes(model: VLBridgeModel) -> None:
    """Push one blank image through encoder and connector: a spec that lies is caught here."""
    plan = model.plan
    size = plan.preprocess.image_size
    pixels = torch.zeros(1, 3, size, size, device=model.device)
    with torch.no_grad():
        image_embeds = model.encode_images(pixels)
        _expect(f"encoder {plan.encoder.name!r}", plan.encoder_out, image_embeds)
        if plan.connector_out is None:
            return  # no LLM joint to check
        was_training = model.connector.training
        model.connector.eval()
        tokens = model.connector(image_embeds)
        model.connector.train(was_training)
    _expect(f"connector {plan.connector.name!r}", plan.connector_out, tokens)


def _expect(who: str, declared: TokenShape, tensor: torch.Tensor) -> None:
    real = tuple(tensor.shape[1:])
    if real != (declared.num_tokens, declared.width):
        raise VLBridgeError(f"{who} declared {declared} but produces {real[0]} tokens x {real[1]} (tensor shape {tuple(tensor.shape)}); its plugin's shape function is wrong")


def load_connector_weights(model: VLBridgeModel, weights: str | Path) -> list[str]:
    """Load a vlbridge checkpoint (directory or connector.safetensors) into the connector, strictly
    for the parameters of the stage it was saved in. Returns the names left as initialised."""
    path = Path(weights)
    allow_missing: list[str] = []
    if path.is_dir():
        meta = read_meta(path)
        stage, allow_missing = int(meta["stage"]), list(meta.get("allow_missing", []))
        path = path / WEIGHTS_FILE
    else:
        stage = model.stage
    tensors = read_connector_weights(path)
    previous = model.stage
    model.connector.set_stage(stage)
    expected = {n for n, p in model.connector.named_parameters()
                if p.requires_grad and not any(fnmatch.fnmatchcase(n, pattern) for pattern in allow_missing)}
    model.connector.set_stage(previous)
    return load_subset(model.connector, tensors, str(path), expected)


def load(checkpoint_dir: str | Path, *, stage: int | None = None, device: str | torch.device | None = None) -> VLBridgeModel:
    """Rebuild a model saved with `model.save(dir)`: the frozen parts from their sources, the
    connector from the checkpoint."""
    directory = Path(checkpoint_dir)
    read_meta(directory)
    return build(directory / ASSEMBLY_FILE, stage=stage, weights=directory, device=device)
