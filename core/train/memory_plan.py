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

    def advice(self, device_bytes: int) -> str:
        """Whether the plan fits a device of `device_bytes`, and if not, which parts to shard or shrink (largest first)."""
        if self.total <= device_bytes:
            return f"fits {_human(device_bytes)} per device ({_human(device_bytes - self.total)} to spare)"
        over = [line for line in sorted(self.lines, key=lambda line: -(line.bytes or 0)) if line.remedy]
        steps = "; ".join(f"{line.name} ({_human(line.bytes)}): {line.remedy}" for line in over[:3])
        return f"does not fit {_human(device_bytes)} per device (needs {_human(self.total)}): {steps}"

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "world_size": self.world_size, "total": self.total,
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


def memory_plan(plan: Plan, *, stage: int, batch_size: int, precision: str, world_size: int = 1, strategy: str = "ddp",
                shard: list[str] | None = None, activation_checkpointing: bool = False) -> MemoryPlan:
    """Each rank's bytes: frozen parts (sharded or whole), trained parameters, gradients, AdamW state, activations."""
    shard = list(shard or []) if strategy == "fsdp" and world_size > 1 else []
    lines = [_frozen("encoder", plan.encoder.params, plan.encoder.options, plan.encoder_out.width, shard, world_size)]
    if stage == 2 and plan.llm is not None and plan.llm_dims is not None:
        lines.append(_frozen("llm", plan.llm.params, plan.llm.options, plan.llm_dims.embed_width, shard, world_size,
                             plan.llm_dims.encoder_decoder))
    trained = plan.trainable_params.get(stage)
    fp32 = None if trained is None else trained * 4
    lines += [
        Line("trained parameters", fp32, f"connector, {count_text(trained, exact=False)} in fp32 (replicated)"),
        Line("gradients", fp32, "fp32, replicated"),
        Line("optimizer state", None if fp32 is None else 2 * fp32, "AdamW: two fp32 moments",
             "lower the connector's size (fewer queries / layers)"),
        _activations(plan, stage, batch_size, precision, activation_checkpointing, llm_in_half="llm" in shard),
    ]
    return MemoryPlan(strategy if world_size > 1 else "one process", world_size, lines)


def plan_for_config(config: Any, plan: Plan, world_size: int) -> MemoryPlan:
    """The memory plan of a TrainConfig (its stage, batch, precision and parallel section) at `world_size`."""
    par = config.parallel
    return memory_plan(plan, stage=config.stage, batch_size=config.batch_size, precision=config.precision,
                       world_size=world_size, strategy=par.strategy, shard=par.parts(config.stage),
                       activation_checkpointing=par.activation_checkpointing)


def _frozen(name: str, params: int | None, options: dict[str, Any], width: int, shard: list[str], world: int,
            encoder_decoder: bool = False) -> Line:
    dtype = str(options.get("dtype", "fp32"))
    if params is None:
        return Line(f"frozen {name}", None, "parameter count not declared")
    full = params * DTYPE_BYTES.get(dtype, 4)
    if name not in shard:
        remedy = (f"shard it: parallel: {{strategy: fsdp, shard: [{name}]}} (1/{world} of it per rank)" if world > 1
                  else "launch several processes with parallel.strategy: fsdp to shard it")
        if dtype == "fp32":
            remedy += f"; or set the {name}'s dtype option to bf16 (half)"
        return Line(f"frozen {name}", full, f"{count_text(params, exact=False)} in {dtype}, whole on every rank", remedy)
    blocks = _blocks(params, width, encoder_decoder)
    gathered = GATHERED_BLOCKS * full // blocks
    return Line(f"frozen {name}", full // world + gathered,
                f"{count_text(params, exact=False)} in {dtype}: 1/{world} shard + ~{GATHERED_BLOCKS} of ~{blocks} blocks gathered",
                "more processes (a smaller shard)")


def _blocks(params: int, width: int, encoder_decoder: bool = False) -> int:
    """The estimated number of transformer blocks: params / (BLOCK_PARAMS x width^2), at least one."""
    return max(1, round(params / (BLOCK_PARAMS[encoder_decoder] * width * width)))


def _activations(plan: Plan, stage: int, batch: int, precision: str, checkpointed: bool, llm_in_half: bool) -> Line:
    elem = DTYPE_BYTES.get(precision, 4)
    values = plan.connector_activations.get(stage)
    connector = None if values is None else batch * values * CONNECTOR_VALUE_BYTES
    unknown = [] if values is not None else ["the connector's (not declared)"]
    remedy = "lower batch_size (raise grad_accum)"
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
        mixed = f" over {weights} weights" if elem == MIXED_VALUE_BYTES else ""
        note = f"estimate: batch {batch} x {tokens} tokens x {width} wide, {precision}{mixed}; {' + '.join(how)}"
        return Line("activations", stored, note + _not_counted(unknown),
                    remedy + ("" if checkpointed else "; or parallel.activation_checkpointing: true"))
    width, tokens = plan.encoder_out.width, plan.encoder_out.num_tokens
    encoder = batch * tokens * width * ENCODER_BLOCK_VALUES * elem  # gone before the connector stores its own
    if connector is not None and connector > encoder:
        return Line("activations", connector, f"estimate: the connector's (declared) at batch {batch}", remedy)
    return Line("activations", encoder, f"estimate: one encoder block's at batch {batch} x {tokens} tokens" + _not_counted(unknown), remedy)


def _not_counted(parts: list[str]) -> str:
    return f"; not counted: {', '.join(parts)}" if parts else ""


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"

