"""Our Q-Former against transformers' Blip2QFormerModel on this CPU: same weights, same inputs.

    python bench/bench_qformer.py [--batch 8] [--reps 9] [--threads N] [--json out.json]

Both sides run BLIP-2's stage-2 connector: ln_vision (transformers: vision_model.post_layernorm) on
a (B, 257, 1408) encoder output, the Q-Former over 32 learned queries (base: 768 wide, 12 layers,
cross-attention every 2nd), and the projection to OPT-2.7b's width 2560 (language_projection).
Weights come from one seeded vlbridge build, converted with `qformer_convert.to_transformers`;
the largest output difference is checked before timing (at most 1e-4; 2e-6 since our forward folds
the cross-attention's key/value weights into the queries: the same math, summed in another order)
and printed with the results; a larger one stops the bench (exit 1) before anything is timed.
Our side runs as in stage 2, after `drop_text_side()`
(a full stage-1 Q-Former also holds the text side: about 80M more parameters).

Time: `--reps` interleaved repetitions (after one warm-up) of a forward (eval, no_grad) and of a
training step (train mode, dropout on: forward, mean-square loss, backward). Reported: the best
wall time (least disturbed by other load), the median wall time, and the median process CPU time.

Memory, two ways, for one step after a warm-up step:
- torch allocator: the peak of bytes allocated by torch during the step (profiler memory events),
  i.e. activations, gradients and temporaries, exactly, without the weights;
- RSS: in a fresh subprocess per side, with MALLOC_MMAP_THRESHOLD_ fixed so that freed buffers go
  back to the OS, the peak RSS during the step (/proc/self/clear_refs resets the mark) above the RSS
  before it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch
from torch import nn

from bench_args import output_file, positive

ENCODER_TOKENS, ENCODER_WIDTH, LLM_WIDTH = 257, 1408, 2560
SEED = 0
PARITY_TOLERANCE = 1e-4  # the two sides sum in other orders (2e-6 measured); a conversion error is far above


def build_pair(side: str) -> nn.Module:
    """One side, with the seeded weights: 'ours' (vlbridge) or 'transformers'."""
    from vlbridge.plugins.connectors.qformer import QFormerOptions
    from vlbridge.plugins.connectors.qformer_model import build
    from vlbridge.plugin.specs import TokenShape

    torch.manual_seed(SEED)
    ours = build(QFormerOptions(ln_vision_eps=1e-6), TokenShape(ENCODER_TOKENS, ENCODER_WIDTH), LLM_WIDTH)
    ours.set_stage(2)
    if side == "ours":
        ours.drop_text_side()  # the stage-2 configuration: no word embeddings, text FFNs or heads
        return ours
    theirs = HFQueryPath(ours)
    del ours
    gc.collect()
    return theirs


class HFQueryPath(nn.Module):
    """transformers' pieces as Blip2ForConditionalGeneration wires them for the query path."""

    def __init__(self, ours: nn.Module):
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        from vlbridge.plugins.connectors.qformer_convert import to_transformers

        config = Blip2QFormerConfig(encoder_hidden_size=ENCODER_WIDTH)  # base defaults: 768 / 12 / 12 / 3072
        self.qformer = Blip2QFormerModel(config)
        self.query_tokens = nn.Parameter(torch.zeros_like(ours.query_tokens))
        self.post_layernorm = nn.LayerNorm(ENCODER_WIDTH, eps=1e-6)
        self.language_projection = nn.Linear(ours.proj.in_features, ours.proj.out_features)
        stage2 = {n: p.detach() for n, p in ours.named_parameters() if p.requires_grad}
        theirs = {k.replace("vision_model.post_layernorm.", "post_layernorm."): v for k, v in to_transformers(stage2).items()}
        self.load_state_dict(theirs, strict=True)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=self.post_layernorm(image_embeds))
        return self.language_projection(out.last_hidden_state)


def forward_only(model: nn.Module, image: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        model(image)


def train_step(model: nn.Module, image: torch.Tensor) -> None:
    model.train()
    model(image).pow(2).mean().backward()
    model.zero_grad(set_to_none=True)


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def allocator_peak_mb(step: Callable[[nn.Module, torch.Tensor], None], model: nn.Module, image: torch.Tensor) -> float:
    """Peak bytes allocated by torch during one step, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model, image)
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        with open(f"{tmp}/trace.json") as trace:
            events = json.load(trace)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0) / 2**20


def make_image(batch: int) -> torch.Tensor:
    return torch.randn(batch, ENCODER_TOKENS, ENCODER_WIDTH, generator=torch.Generator().manual_seed(1))


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def memory_child(side: str, batch: int) -> dict[str, float]:
    """In a fresh process: peak RSS of one forward and one training step above the RSS before it."""
    model, image = build_pair(side), make_image(batch)
    result = {"weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}
    for name, step in (("forward", forward_only), ("train_step", train_step)):
        step(model, image)  # warm-up: one-time allocations (oneDNN, caches) are not the step's
        gc.collect()
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset VmHWM to the current RSS
        before = _rss_kb("VmRSS")
        step(model, image)
        result[f"{name}_peak_mb"] = (_rss_kb("VmHWM") - before) / 1024
    return result


def measure_memory(side: str, batch: int, threads: int | None = None) -> dict[str, float]:
    """`memory_child` in a fresh process, on the bench's threads; its error output is shown if it fails."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--memory-child", side, "--batch", str(batch)] + (["--threads", str(threads)] if threads else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_qformer: the memory measurement of {side!r} failed (exit {done.returncode}):\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(batch: int, reps: int) -> dict[str, object]:
    ours, theirs, image = build_pair("ours"), build_pair("transformers"), make_image(batch)
    sides, steps = (("ours", ours), ("transformers", theirs)), (("forward", forward_only), ("train_step", train_step))
    ours.eval(), theirs.eval()
    with torch.no_grad():
        max_diff = (ours(image) - theirs(image)).abs().max().item()
    if not max_diff <= PARITY_TOLERANCE:  # NaN too: the timings would compare two different computations
        raise SystemExit(f"bench_qformer: the two sides' connector outputs differ by {max_diff:.2e} (more than "
                         f"{PARITY_TOLERANCE:g}): they do not compute the same Q-Former, so no timing is reported")
    wall: dict[str, list[float]] = {f"{s}_{m}": [] for s, _ in sides for m, _ in steps}
    cpu: dict[str, list[float]] = {k: [] for k in wall}
    for rep in range(reps + 1):  # rep 0 is the warm-up
        for mode, step in steps:
            for side, model in sides:
                elapsed, used = timed(lambda: step(model, image))
                if rep:
                    wall[f"{side}_{mode}"].append(elapsed)
                    cpu[f"{side}_{mode}"].append(used)
    allocator = {f"{side}_{mode}": allocator_peak_mb(step, model, image) for side, model in sides for mode, step in steps}
    return {"max_abs_diff": max_diff, "best_s": {k: min(v) for k, v in wall.items()},
            "median_s": {k: statistics.median(v) for k, v in wall.items()},
            "median_cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
            "allocator_peak_mb": allocator, "wall_s": wall, "cpu_s": cpu}


def report(batch: int, reps: int, result: dict, memory: dict[str, dict[str, float]]) -> str:
    rows = []
    for mode, label in (("forward", "forward (eval, no_grad)"), ("train_step", "training step (fwd+bwd)")):
        for key, what in (("best_s", "best wall s"), ("median_s", "median wall s"), ("median_cpu_s", "median CPU s")):
            rows.append((f"{label}, {what}", result[key][f"ours_{mode}"], result[key][f"transformers_{mode}"]))
    for mode, label in (("forward", "forward"), ("train_step", "training step")):
        alloc = result["allocator_peak_mb"]
        rows.append((f"{label}: peak torch-allocated, MiB", alloc[f"ours_{mode}"], alloc[f"transformers_{mode}"]))
        rows.append((f"{label}: peak RSS above the RSS before, MiB", memory["ours"][f"{mode}_peak_mb"], memory["transformers"][f"{mode}_peak_mb"]))
    rows.append(("weights resident in the module, MiB", memory["ours"]["weights_mb"], memory["transformers"]["weights_mb"]))
    lines = [
        f"Q-Former base, batch {batch}, encoder output {ENCODER_TOKENS}x{ENCODER_WIDTH}, fp32, {reps} reps after 1 warm-up",
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
        f"torch {torch.__version__}, transformers {__import__('transformers').__version__}",
        f"max |ours - transformers| on the connector outputs: {result['max_abs_diff']:.2e}",
        "",
        "| measure | vlbridge | transformers | vlbridge / transformers |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {a:.3f} | {b:.3f} | {a / b:.3f} |" for name, a, b in rows]
    lines += ["", "Per-repetition ratios (each of ours over the transformers run right after it): median [min - max]", ""]
    for mode in ("forward", "train_step"):
        for key in ("cpu_s", "wall_s"):
            ratios = sorted(a / b for a, b in zip(result[key][f"ours_{mode}"], result[key][f"transformers_{mode}"]))
            lines.append(f"- {mode}, {key}: {statistics.median(ratios):.3f} [{ratios[0]:.3f} - {ratios[-1]:.3f}]")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=positive, default=8)
    parser.add_argument("--reps", type=positive, default=9)
    parser.add_argument("--threads", type=positive, help="torch threads (default: torch's); 1 makes CPU time robust to other load")
    parser.add_argument("--json", type=output_file, help="also write the raw numbers here")
    parser.add_argument("--memory-child", choices=("ours", "transformers"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.batch)))
        return
    memory = {side: measure_memory(side, args.batch, args.threads) for side in ("ours", "transformers")}
    result = compare(args.batch, args.reps)
    print(report(args.batch, args.reps, result, memory))
    if args.json:
        from vlbridge.files.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps({"batch": args.batch, "reps": args.reps, **result, "memory": memory}, indent=2))


if __name__ == "__main__":
    main()
