"""A memory plan before launch: what each rank will hold, from the assembly's declarations (no torch).

Why an estimate from declarations: the point is to know *before* loading 7B weights whether a run
fits, so nothing is built. Parameter bytes are exact where the plugins declare their counts; what
is estimated (and says so) is the number of blocks (params / (12 x width^2), the transformer rule;
14 for an encoder-decoder, whose decoder blocks add cross-attention) and activations: what a block
stores for backward per token and unit of width, measured on transformers' blocks (BLOCK_VALUES);
with activation checkpointing only each block's input is kept, plus one block recomputed at a
time. Counted where the plugins declare them (optional declarations; without them the line says
`not counted: ...`): the LM loss's fp32 log-probabilities (batch x positions x LLMDims.vocab_size)
and the connector's stored values (ConnectorSpec.activations: the Q-Former's query pass in stage 2,
its ITC/ITM/ITG passes in stage 1). Measured against tiny runs in tests/test_memory_plan.py
(measured / planned 0.63 to 1.11); the README states the error.

What trains besides the connector (an unfrozen encoder, LoRA adapters) is counted in the trained
lines and, for the encoder, in the activations (its trained blocks keep their values for backward).
The counts are exact when the model is built (the trainer, `validate --train`); from the config
alone (`--plan-only`) the encoder's share is estimated from its declared parameters and LoRA's is
named as not counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from vlbridge.assemblies.plan import Plan, count_text

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Values one LLM block stores for backward, per token and unit of width, by encoder_decoder. Measured on
# CPU in fp32 (SDPA attention keeps no attention matrix; no dropout): decoder-only 8.6 (OPT: ReLU) to
# 11.3 (Llama: SwiGLU); encoder-decoder 16.5 to 19.6 (T5: gated GELU, a position-bias mask per
# attention, the decoder's cross-attention). Korthikanti et al. (2022) count 17 for a GPT block that
# keeps GELU's input and dropout masks. Rounded towards the larger end: a plan should not promise room.
BLOCK_VALUES = {False: 11, True: 18}
ENCODER_BLOCK_VALUES = 17  # stage 1: the frozen encoder's one block in flight (a ViT block, Korthikanti's count)
# bf16/fp16 autocast over fp32 LLM weights: the matmuls' outputs are half, while the residual stream,
# norms and softmax stay fp32; measured 1.2x (T5) to 1.45x (OPT) the half-precision bytes: 3 a value
MIXED_VALUE_BYTES = 3
# The connector's values are counted at 4 bytes: its weights train in fp32 and, under autocast, its
# LayerNorm outputs and softmax stay fp32 (the tiny Q-Former keeps 3.8 bytes a value in bf16)
CONNECTOR_VALUE_BYTES = 4
LOGPROB_BYTES = 4  # the LM loss upcasts the logits: log_softmax keeps its fp32 output, in every precision
BLOCK_PARAMS = {False: 12, True: 14}  # a block's parameters / width^2 (attention 4, 4x MLP 8; + cross-attention 4 in half)
GATHERED_BLOCKS = 2  # fsdp holds the block it runs and the one it prefetches
# ... unless reshard_after_forward is false: then every block stays gathered after its forward, until
# its backward (the frozen encoder, which has none, stays gathered for good; measured on FSDP2)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GiB|GB|MiB|MB|TiB|TB)\s*$", re.IGNORECASE)
_UNITS = {"gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6, "tib": 2**40, "tb": 10**12}


@dataclass(frozen=True)
class Line:
    """One part of a rank's memory: bytes, and what to do to shrink it."""

    name: str
    bytes: int | None  # None: not known from the declarations
    note: str = ""
    remedy: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    """Per-rank bytes for a strategy and world size."""

    strategy: str
    world_size: int
    lines: list[Line] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(line.bytes or 0 for line in self.lines)

    def describe(self) -> str:
        head = (f"memory plan per rank ({self.strategy}, {self.world_size} processes):" if self.world_size > 1
                else "memory plan (one process):")
        rows = [f"  {line.name:<22} {_human(line.bytes):>10}  {line.note}".rstrip() for line in self.lines]
        return "\n".join([head, *rows, f"  {'total':<22} {_human(self.total):>10}"])

    @property
    def uncounted(self) -> list[str]:
        """Lines with a part the declarations could not size (bytes unknown, or `not counted: ...` in the note):
        the total is a lower bound then, and a verdict must say so."""
        return [line.name for line in self.lines if line.bytes is None or "not counted:" in line.note]

    def advice(self, device_bytes: int) -> str:
        """Whether the plan fits a device of `device_bytes`, and if not, which parts to shard or shrink (largest first)."""
        if self.total <= device_bytes:
            caveat = (f"; not counted: part of {', '.join(self.uncounted)} (see those lines), which must fit in what is to spare"
                      if self.uncounted else "")
            return f"fits {_human(device_bytes)} per device ({_human(device_bytes - self.total)} to spare){caveat}"
        over = [line for line in sorted(self.lines, key=lambda line: -(line.bytes or 0)) if line.remedy]
        steps = "; ".join(f"{line.name} ({_human(line.bytes)}): {line.remedy}" for line in over[:3])
        return f"does not fit {_human(device_bytes)} per device (needs {_human(self.total)}): {steps}"

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "world_size": self.world_size, "total": self.total, "uncounted": self.uncounted,
                "lines": [{"name": line.name, "bytes": line.bytes, "note": line.note} for line in self.lines]}


def parse_size(text: str) -> int:
    """'40GiB', '40 GB', '512MiB' -> bytes; anything else (a bare number: 40 meant as GB would plan for 40
    bytes; zero) is a ValueError saying what is accepted."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size with its unit; write e.g. 40GiB, 80GB or 512MiB")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(f"{text!r}: a device has more memory than that; write e.g. 40GiB, 80GB or 512MiB")
    return size


@dataclass(frozen=True)
class Trained:
    """What trains besides the connector: parameter counts (None: not known before the model is built)
    and the encoder blocks whose activations are kept for backward."""

    encoder: int | None = 0
    lora: int | None = 0
    encoder_blocks: int | None = 0  # None: the encoder trains, but how many blocks is not known (no declared count)
    encoder_checkpointed: bool = False
    exact: bool = True  # counted on the built model, not estimated from declarations
    connector: int | None = None  # counted on the built model (None: the connector's declared count)

    def parts(self, connector: int | None) -> list[tuple[str, int | None]]:
        """(part, parameters) of every part that trains."""
        extra = [("encoder", self.encoder) if self.encoder != 0 else None, ("LoRA", self.lora) if self.lora != 0 else None]
        return [("connector", connector), *(part for part in extra if part is not None)]


def trained_by(finetune: Any, plan: Plan, counts: dict[str, int] | None = None) -> Trained:
    """`Trained` for a config's finetune section: exact from `counts` (trainable parameters per part of the
    built model: connector, encoder, lora), else estimated from the encoder's declared parameters."""
    encoder = finetune.encoder
    if not encoder.trains:
        blocks = 0
        estimate: int | None = 0
    else:
        depth = None if plan.encoder.params is None else _blocks(plan.encoder.params, plan.encoder_out.width)
        # all of an encoder whose depth cannot be estimated (no declared count): None, named as not counted
        blocks = depth if encoder.unfreeze == "all" else min(int(encoder.unfreeze), depth or int(encoder.unfreeze))
        estimate = (plan.encoder.params if encoder.unfreeze == "all" or plan.encoder.params is None or not depth
                    else plan.encoder.params * blocks // depth)
    lora_estimate = None if finetune.lora is not None else 0
    if counts is not None:
        return Trained(counts.get("encoder", 0), counts.get("lora", 0), blocks, encoder.grad_checkpointing,
                       connector=counts.get("connector"))
    return Trained(estimate, lora_estimate, blocks, encoder.grad_checkpointing, exact=encoder.unfreeze in ("none", "all"))


def memory_plan(plan: Plan, *, stage: int, batch_size: int, precision: str, world_size: int = 1, strategy: str = "ddp",
                shard: list[str] | None = None, activation_checkpointing: bool = False, trained: Trained = Trained(),
                reshard_after_forward: bool = True) -> MemoryPlan:
    """Each rank's bytes: frozen parts (sharded or whole), trained parameters, gradients, AdamW state, activations."""
    shard = list(shard or []) if strategy == "fsdp" and world_size > 1 else []
    frozen_encoder = plan.encoder.params
    if frozen_encoder is not None and trained.encoder:  # the trained part is counted, in fp32, with the trained parameters
        frozen_encoder = max(0, frozen_encoder - trained.encoder)
    lines = [_frozen("encoder", frozen_encoder, plan.encoder.options, plan.encoder_out.width, shard, world_size,
                     reshard=reshard_after_forward, exact=plan.encoder.params_exact)]
    if stage == 2 and plan.llm is not None and plan.llm_dims is not None:
        lines.append(_frozen("llm", plan.llm.params, plan.llm.options, plan.llm_dims.embed_width, shard, world_size,
                             plan.llm_dims.encoder_decoder, reshard=reshard_after_forward, exact=plan.llm.params_exact))
    # the built model's count where there is one: a connector that declares none was "counted when the model
    # is built", even in the plan printed from the built model
    parts = trained.parts(plan.trainable_params.get(stage) if trained.connector is None else trained.connector)
    known = [count for _, count in parts if count is not None]
    fp32 = sum(known) * 4 if known else None
    what = " + ".join(f"{name} {count_text(count, exact=False)}" for name, count in parts if count is not None) or "?"
    left_out = [f"{name} (counted when the model is built: vlbridge validate --train without --plan-only)"
                for name, count in parts if count is None]
    estimate = "" if trained.exact or trained.encoder is None else "; the encoder's share estimated from its declared count"
    lines += [
        Line("trained parameters", fp32, f"{what} in fp32 (replicated){estimate}{_not_counted(left_out)}"),
        Line("gradients", fp32, "fp32, replicated"),
        Line("optimizer state", None if fp32 is None else 2 * fp32, "AdamW: two fp32 moments",
             "lower the connector's size (fewer queries / layers)" + ("; train fewer encoder blocks" if trained.encoder else "")),
        _activations(plan, stage, batch_size, precision, activation_checkpointing, llm_in_half="llm" in shard, trained=trained),
    ]
    return MemoryPlan(strategy if world_size > 1 else "one process", world_size, lines)


def plan_for_config(config: Any, plan: Plan, world_size: int, counts: dict[str, int] | None = None) -> MemoryPlan:
    """The memory plan of a TrainConfig (its stage, batch, precision, finetune and parallel sections) at
    `world_size`; `counts`: the built model's trainable parameters per part, which make the trained lines exact."""
    par = config.parallel
    return memory_plan(plan, stage=config.stage, batch_size=config.batch_size, precision=config.precision,
                       world_size=world_size, strategy=par.strategy, shard=par.parts(config.stage),
                       activation_checkpointing=par.activation_checkpointing,
                       trained=trained_by(config.finetune, plan, counts), reshard_after_forward=par.reshard_after_forward)


def _frozen(name: str, params: int | None, options: dict[str, Any], width: int, shard: list[str], world: int,
            encoder_decoder: bool = False, reshard: bool = True, exact: bool = True) -> Line:
    """`exact=False`: the plugin declared a SizeEstimate, so the count reads '~64.5K params', never as exact."""
    dtype = str(options.get("dtype", "fp32"))
    if params is None:
        return Line(f"frozen {name}", None, "parameter count not declared")
    full = params * DTYPE_BYTES.get(dtype, 4)
    size = ("" if exact else "~") + count_text(params, exact=False)
    if name not in shard:
        remedy = (f"shard it: parallel: {{strategy: fsdp, shard: [{name}]}} (1/{world} of it per rank)" if world > 1
                  else "launch several processes with parallel.strategy: fsdp to shard it")
        if dtype == "fp32":
            remedy += f"; or set the {name}'s dtype option to bf16 (half)"
        return Line(f"frozen {name}", full, f"{size} in {dtype}, whole on every rank", remedy)
    blocks = _blocks(params, width, encoder_decoder)
    if not reshard:
        return Line(f"frozen {name}", full // world + full,
                    f"{size} in {dtype}: 1/{world} shard + all ~{blocks} blocks gathered "
                    "(reshard_after_forward: false keeps them after the forward pass)",
                    "parallel.reshard_after_forward: true (gathers ~2 blocks at a time)")
    gathered = GATHERED_BLOCKS * full // blocks
    return Line(f"frozen {name}", full // world + gathered,
                f"{size} in {dtype}: 1/{world} shard + ~{GATHERED_BLOCKS} of ~{blocks} blocks gathered",
                "more processes (a smaller shard)")


def _blocks(params: int, width: int, encoder_decoder: bool = False) -> int:
    """The estimated number of transformer blocks: params / (BLOCK_PARAMS x width^2), at least one."""
    return max(1, round(params / (BLOCK_PARAMS[encoder_decoder] * width * width)))


def _activations(plan: Plan, stage: int, batch: int, precision: str, checkpointed: bool, llm_in_half: bool,
                 trained: Trained) -> Line:
    elem = DTYPE_BYTES.get(precision, 4)
    values = plan.connector_activations.get(stage)
    connector = None if values is None else batch * values * CONNECTOR_VALUE_BYTES
    unknown = [] if values is not None else ["the connector's (not declared)"]
    if trained.encoder_blocks is None:
        unknown.append("the trained encoder blocks' (its parameter count is not declared, so neither is its depth)")
    remedy = "lower batch_size (raise grad_accum)"
    encoder_kept, encoder_how = _trained_encoder_values(plan, batch, elem, trained)
    if encoder_kept:
        remedy += "" if trained.encoder_checkpointed else "; or finetune.encoder.grad_checkpointing: true"
    if stage == 2 and plan.llm is not None and plan.llm_dims is not None and plan.total_tokens is not None and plan.llm.params:
        dims, tokens = plan.llm_dims, plan.total_tokens
        width, encoder_decoder = dims.embed_width, dims.encoder_decoder
        blocks = _blocks(plan.llm.params, width, encoder_decoder)
        weights = str(plan.llm.options.get("dtype", "fp32"))
        if elem == 2 and weights == "fp32" and not llm_in_half:
            elem = MIXED_VALUE_BYTES  # autocast over fp32 weights (fsdp would gather them in half)
        per_block = batch * tokens * width * BLOCK_VALUES[encoder_decoder] * elem
        stored = blocks * batch * tokens * width * elem + per_block if checkpointed else blocks * per_block
        how = ["block inputs + one block (checkpointed)" if checkpointed else f"~{blocks} LLM blocks"]
        if dims.vocab_size is None:
            unknown.append("the log-probabilities (vocabulary not declared)")
        else:  # decoder-only: every position's logits (the loss shifts them); encoder-decoder: the decoder's
            positions = plan.max_text_tokens if encoder_decoder else tokens
            stored += batch * positions * dims.vocab_size * LOGPROB_BYTES
            how.append(f"log-probabilities {positions} x {dims.vocab_size} fp32")
        if connector is not None:
            stored += connector
            how.append("the connector's")
        if encoder_kept:
            stored += encoder_kept
            how.append(encoder_how)
        mixed = f" over {weights} weights" if elem == MIXED_VALUE_BYTES else ""
        note = f"estimate: batch {batch} x {tokens} tokens x {width} wide, {precision}{mixed}; {' + '.join(how)}"
        return Line("activations", stored, note + _not_counted(unknown),
                    remedy + ("" if checkpointed else "; or parallel.activation_checkpointing: true"))
    width, tokens = plan.encoder_out.width, plan.encoder_out.num_tokens
    if encoder_kept:  # the trained blocks' values stay until backward, beside the connector's
        stored, how = encoder_kept + (connector or 0), [encoder_how] + (["the connector's"] if connector is not None else [])
        return Line("activations", stored, f"estimate: batch {batch} x {tokens} tokens; {' + '.join(how)}" + _not_counted(unknown), remedy)
    encoder = batch * tokens * width * ENCODER_BLOCK_VALUES * elem  # gone before the connector stores its own
    if connector is not None and connector > encoder:
        return Line("activations", connector, f"estimate: the connector's (declared) at batch {batch}" + _not_counted(unknown), remedy)
    return Line("activations", encoder, f"estimate: one encoder block's at batch {batch} x {tokens} tokens" + _not_counted(unknown), remedy)


def _trained_encoder_values(plan: Plan, batch: int, elem: int, trained: Trained) -> tuple[int, str]:
    """Bytes the encoder's trained blocks keep for backward (all their values, or with gradient
    checkpointing each block's input plus one block recomputed), and how they were counted."""
    if not trained.encoder_blocks:
        return 0, ""
    width, tokens, blocks = plan.encoder_out.width, plan.encoder_out.num_tokens, trained.encoder_blocks
    one_block = batch * tokens * width * ENCODER_BLOCK_VALUES * elem
    if trained.encoder_checkpointed:
        inputs = f"{blocks} trained encoder blocks' inputs" if blocks > 1 else "the trained encoder block's input"
        return blocks * batch * tokens * width * elem + one_block, f"{inputs} + one block (checkpointed)"
    return blocks * one_block, f"~{blocks} trained encoder block{'s' if blocks > 1 else ''}"


def _not_counted(parts: list[str]) -> str:
    return f"; not counted: {', '.join(parts)}" if parts else ""


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"

