"""Training steps/s with and without the frozen-feature cache, on this CPU, side by side in one run.

    python bench/bench_train.py [--batch 16] [--steps 3] [--reps 5] [--threads 1] [--encoder-blocks 12]
                                [--qformer mini|blip2] [--dropout 0.1] [--json out.json] [--profile STEPS]

The model is BLIP-2 scaled down so that the encoder dominates as EVA ViT-g does: every width of
ViT-g (1408, MLP 6144) and of the Q-Former (768, FFN 3072) divided by 4, the Q-Former's 12 layers by
4, and the encoder's depth (12 blocks) set so that its forward is 68% of a stage-1 step's FLOPs, as
ViT-g's 520.7 of ~760 GFLOP per sample in BLIP-2, when every stage-1 pass computed its own image
keys/values; with that work shared it is 78% here and for BLIP-2 (~142 GFLOP of Q-Former per
sample): the sharing removes the same part at both sizes. 224 px (257 tokens), 32 queries, 32 text tokens.
Parameters: encoder 19.2M, Q-Former 3.0M (ViT-g 985M, Q-Former 187M). The Q-Former keeps the tiny
tokenizer's 1024-word vocabulary (BERT's is 30523; no download). Stage 2 adds the tiny OPT (the only
LLM available offline), so its LLM costs next to nothing.

Each step is what the trainer does: the next batch from the real data path (JPEG decode + BLIP-2's
train transform, or the cache's memory-mapped rows), the real objective, backward, AdamW. DataLoader
workers: 0, so every cost is counted on the same cores. Reps interleave the modes; reported are
medians of wall time and of process CPU time (with one thread, CPU time is immune to other load).

FLOPs per step are counted with torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions,
attention; forward and backward), and set against this machine's fp32 torch.mm rate (2048^3, and a
Q-Former-sized shape for comparison), timed in every repetition between the training steps so that
both see the same load. `--qformer blip2` times the cached stage-1 step of BLIP-2's own Q-Former
(768 wide, 12 layers, 12 heads of 64, FFN 3072, on 1408-wide cached features; vocabulary still 1024)
instead of the scaled-down one: only that mode, since its one-block encoder only fills the cache.
`--dropout 0` turns the Q-Former's dropout off, and `--heads 3` makes its heads
64 wide (BLIP-2's head width; 16 at the default 12 heads), to show what each costs.
`--profile 2` instead profiles two cached stage-1 steps: ops by self CPU time, the passes (ITC, ITM,
ITG, image K/V, loss; forward, backward, optimizer) as record_function ranges, and the GEMMs by shape.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import vlbridge
from vlbridge.data.build import build_dataset, make_loader
from vlbridge.files.atomic import atomic_write_text
from vlbridge.train.cache_dataset import feature_dataset
from vlbridge.train.cache_build import BuildSettings, build_cache
from vlbridge.train.objectives import Stage1Objective, Stage2Objective

from bench_args import at_least, output_file, positive, probability

ENCODER = {"use": "eva-vit-g", "options": {"width": 352, "depth": 13, "heads": 16, "mlp_hidden": 1536}}  # 12 blocks kept
QFORMER = {"use": "qformer", "options": {"variant": "tiny", "num_query_tokens": 32, "hidden_size": 192, "num_layers": 3,
                                         "num_heads": 12, "intermediate_size": 768, "max_text_positions": 64}}
LLM = {"use": "opt", "options": {"variant": "tiny"}}
# `--qformer blip2`: BLIP-2's own Q-Former (BERT-base: 768 wide, 12 layers, 12 heads of 64, FFN 3072) on
# ViT-g-wide (1408) cached features; the encoder keeps one block, as it only fills the cache.
BLIP2_QFORMER = {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072}
BLIP2_ENCODER = {"width": 1408, "heads": 16, "mlp_hidden": 6144}
CPU_ATTENTION = {  # torch's FLOP counter knows the CUDA attention kernels only; these are the CPU ones
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
}
WORDS = "a man woman dog cat red blue green small large riding sitting near on under the park street table field".split()


def assembly(stage: int, blocks: int = 12, heads: int = 12, qformer: str = "mini") -> dict[str, Any]:
    encoder = {"use": ENCODER["use"], "options": {**ENCODER["options"], "depth": blocks + 1}}  # eva-vit-g keeps depth - 1
    connector = {"use": QFORMER["use"], "options": {**QFORMER["options"], "num_heads": heads}}
    if qformer == "blip2":
        encoder["options"].update(BLIP2_ENCODER, depth=2)
        connector["options"].update(BLIP2_QFORMER, num_heads=heads)  # --heads still applies (default 12: BLIP-2's)
    base = {"name": f"bench-mini-blip2-stage{stage}", "encoder": encoder, "connector": connector}
    return {**base, "llm": LLM} if stage == 2 else base


def write_data(root: Path, count: int) -> Path:
    """`count` 480x360 JPEGs (smooth random colour fields, like photos in size) and a JSONL of captions."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((480, 360), Image.BICUBIC).save(root / f"{i}.jpg", quality=90)
        rows.append({"image": f"{i}.jpg", "text": " ".join(rng.choice(WORDS, size=10)), "image_id": i})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def batches(dataset: Any, batch: int) -> Iterator[dict[str, Any]]:
    """Endless batches over seeded epochs, as the trainer's BatchStream."""
    epoch = 0
    while True:
        yield from make_loader(dataset, batch, epoch=epoch, drop_last=True)
        epoch += 1


def train_step(model: Any, objective: Any, optimizer: torch.optim.Optimizer, batch: dict[str, Any]) -> float:
    loss = objective(model, batch)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def step_flops(model: Any, objective: Any, batch: dict[str, Any]) -> tuple[int, dict[str, int]]:
    """Matmul/conv/attention FLOPs of one forward + backward, and their split by op."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        objective(model, batch)["loss"].backward()
    model.zero_grad(set_to_none=True)
    by_op: dict[str, int] = {}
    for ops in counter.get_flop_counts().values():
        for op, flops in ops.items():
            by_op[str(op)] = max(by_op.get(str(op), 0), int(flops))  # the Global entry holds the totals
    return counter.get_total_flops(), by_op


def time_steps(step: Callable[[], Any], count: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per step over `count` steps."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        step()
    return (time.perf_counter() - wall) / count, (time.process_time() - cpu) / count


def matmul_rate(m: int, k: int, n: int, seconds: float = 1.0) -> tuple[float, float]:
    """fp32 torch.mm GFLOP/s at one shape over about `seconds`: (median wall rate, median CPU-time rate)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    walls, cpus, started = [], [], time.perf_counter()
    while time.perf_counter() - started < seconds or len(walls) < 3:
        w, c = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    flops = 2 * m * k * n / 1e9
    return flops / statistics.median(walls), flops / max(statistics.median(cpus), 1e-9)


class Mode:
    """One (stage, source) pair: model, objective, optimizer and its endless batches."""

    def __init__(self, stage: int, source: str, model: Any, dataset: Any, batch: int):
        self.stage, self.source, self.model = stage, source, model
        self.objective = (Stage1Objective if stage == 1 else Stage2Objective)(generator=torch.Generator().manual_seed(0))
        self.optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
        self.batches = batches(dataset, batch)
        self.walls: list[float] = []
        self.cpus: list[float] = []

    @property
    def name(self) -> str:
        return f"stage {self.stage}, {self.source}"

    def step(self) -> float:
        return train_step(self.model, self.objective, self.optimizer, next(self.batches))


def build_modes(data: Path, cache: Path, args: argparse.Namespace) -> list[Mode]:
    config = {"format": "jsonl", "paths": [str(data)], "num_workers": 0}
    modes = []
    for stage in (1,) if args.qformer == "blip2" else (1, 2):
        model = vlbridge.build(assembly(stage, args.encoder_blocks, args.heads, args.qformer), stage=stage, random_weights=True).train()  # a random mini ViT on purpose
        set_dropout(model.connector, args.dropout)
        cached = feature_dataset(config, cache, train=True, encoder=model.encoder, assembly=model.assembly)
        if args.qformer != "blip2":  # the one-block encoder there only fills the cache: no step from images
            modes.append(Mode(stage, "images", model, build_dataset(config, model.plan.preprocess, train=True), args.batch))
        modes.append(Mode(stage, "feature cache", model, cached, args.batch))
    return modes


def set_dropout(connector: torch.nn.Module, p: float) -> None:
    """The Q-Former's hidden and attention dropout (BERT's 0.1 unless changed for a diagnosis)."""
    for module in connector.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        if hasattr(module, "attn_dropout"):
            module.attn_dropout = p


def phase_split(mode: Mode, steps: int) -> dict[str, float]:
    """Median wall seconds of batch loading, forward, backward and optimizer within a step."""
    parts: dict[str, list[float]] = {"data": [], "forward": [], "backward": [], "optimizer": []}
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(mode.batches)
        t1 = time.perf_counter()
        loss = mode.objective(mode.model, batch)["loss"]
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        mode.optimizer.step()
        mode.optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[key].append(value)
    return {key: statistics.median(values) for key, values in parts.items()}


def measure(modes: list[Mode], args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    """Interleaved repetitions of every mode's steps and of two matmuls; returns the matmul rates."""
    for mode in modes:  # warm-up: first-call allocations, tokenizer caches
        mode.step()
    width, ffn = (768, 3072) if args.qformer == "blip2" else (192, 768)
    rates: dict[str, list[tuple[float, float]]] = {"2048x2048x2048": [], f"{args.batch * 64}x{width}x{ffn}": []}
    for _ in range(args.reps):
        for mode in modes:
            wall, cpu = time_steps(mode.step, args.steps)
            mode.walls.append(wall)
            mode.cpus.append(cpu)
        rates["2048x2048x2048"].append(matmul_rate(2048, 2048, 2048))
        rates[f"{args.batch * 64}x{width}x{ffn}"].append(matmul_rate(args.batch * 64, width, ffn))
    return rates


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_data(root, args.batch * (args.steps + 2))
        started = time.perf_counter()
        manifest = build_cache(assembly(1, args.encoder_blocks, args.heads, args.qformer), [{"format": "jsonl", "paths": [str(data)], "num_workers": 0}],
                               root / "cache", BuildSettings(batch_size=args.batch, dtype=args.dtype, num_workers=0),
                               random_weights=True)  # the random mini ViT, on purpose
        cache_rate = manifest.rows / (time.perf_counter() - started)
        modes = build_modes(data, root / "cache", args)
        flops = {mode.name: step_flops(mode.model, mode.objective, next(mode.batches)) for mode in modes}
        rates = measure(modes, args)
        phases = {mode.name: phase_split(mode, args.steps) for mode in modes[:2]}
        params = {"encoder": sum(p.numel() for p in modes[0].model.encoder.parameters()),
                  "qformer_stage1": sum(p.numel() for p in modes[0].model.trainable_parameters())}
    result = report(args, modes, flops, rates)
    result.update(machine={**machine(), "load_before": load, "load_after": os.getloadavg()}, phases_s=phases,
                  cache_build_images_per_s=cache_rate, params=params)
    return result


def report(args: argparse.Namespace, modes: list[Mode], flops: dict[str, Any], rates: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    """Medians per mode, FLOP rates, and fractions of the 2048^3 matmul rate (by wall and by CPU time)."""
    mm_wall = statistics.median(w for w, _ in rates["2048x2048x2048"])
    mm_cpu = statistics.median(c for _, c in rates["2048x2048x2048"])
    rows = {}
    for mode in modes:
        wall, cpu = statistics.median(mode.walls), statistics.median(mode.cpus)
        total, by_op = flops[mode.name]
        gflop = total / 1e9
        rows[mode.name] = {"steps_per_s": 1 / wall, "wall_s": wall, "cpu_s": cpu, "samples_per_s": args.batch / wall,
                           "gflop_per_step": gflop, "gflops_wall": gflop / wall, "fraction_wall": gflop / wall / mm_wall,
                           "gflops_cpu": gflop / cpu, "fraction_cpu": gflop / cpu / mm_cpu,
                           "gflop_by_op": {op: f / 1e9 for op, f in by_op.items()}, "walls": mode.walls, "cpus": mode.cpus}
    speedup = {f"stage {stage}": {kind: rows[f"stage {stage}, images"][f"{kind}_s"] / rows[f"stage {stage}, feature cache"][f"{kind}_s"]
                                  for kind in ("wall", "cpu")} for stage in (1, 2) if f"stage {stage}, images" in rows}
    matmul = {shape: {"wall": statistics.median(w for w, _ in values), "cpu": statistics.median(c for _, c in values),
                      "all": values} for shape, values in rates.items()}
    return {"args": vars(args), "matmul_gflops": matmul, "modes": rows, "speedup": speedup}


def print_report(result: dict[str, Any]) -> None:
    m, p = result["machine"], result["params"]
    print(f"{m['cpu']}, {m['cores']} cores, {m['threads']} torch thread(s), {m['capability']}, torch {m['torch']}; "
          f"load average {m['load_before'][0]:.2f} before, {m['load_after'][0]:.2f} after")
    print(f"encoder {p['encoder'] / 1e6:.1f}M parameters, Q-Former (stage 1) {p['qformer_stage1'] / 1e6:.1f}M; "
          f"cache build {result['cache_build_images_per_s']:.1f} images/s")
    print("fp32 torch.mm GFLOP/s (median; wall / CPU time): " + ", ".join(
        f"{shape}: {v['wall']:.1f} / {v['cpu']:.1f}" for shape, v in result["matmul_gflops"].items()))
    print("| mode | steps/s | samples/s | s/step wall | s/step CPU | GFLOP/step | GFLOP/s wall | of 2048^3 mm, wall | of mm, CPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in result["modes"].items():
        print(f"| {name} | {r['steps_per_s']:.3f} | {r['samples_per_s']:.2f} | {r['wall_s']:.3f} | {r['cpu_s']:.3f} | "
              f"{r['gflop_per_step']:.1f} | {r['gflops_wall']:.1f} | {100 * r['fraction_wall']:.0f}% | {100 * r['fraction_cpu']:.0f}% |")
    if result["speedup"]:
        print("speedup from the cache (wall / CPU time): " + ", ".join(
            f"{stage}: {v['wall']:.2f}x / {v['cpu']:.2f}x" for stage, v in result["speedup"].items()))
    for name, parts in result["phases_s"].items():
        print(f"{name}, median wall s: " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()))


PASSES = {"image_context": "image K/V", "query_outputs": "ITC query pass", "text_features": "ITC text pass",
          "itm_logits": "ITM pass", "itg_logits_from_queries": "ITG pass"}  # connector method -> range
LOSSES = ("itc_loss", "itm_loss", "itg_loss", "sample_hard_negatives")  # objectives' module functions -> range "loss"


def label_passes(qformer: torch.nn.Module) -> None:
    """Wrap the stage-1 passes and losses in record_function ranges, so the profile says what each costs."""
    from vlbridge.train import objectives

    for method, label in PASSES.items():
        setattr(qformer, method, _ranged(getattr(qformer, method), label))
    for name in LOSSES:
        setattr(objectives, name, _ranged(getattr(objectives, name), "loss"))


def _ranged(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)
    return wrapper


def ranged_step(mode: Mode) -> None:
    """One training step with forward, backward and optimizer ranges (backward runs in this thread on CPU)."""
    batch = next(mode.batches)
    with torch.profiler.record_function("forward"):
        loss = mode.objective(mode.model, batch)["loss"]
    with torch.profiler.record_function("backward"):
        loss.backward()
    with torch.profiler.record_function("optimizer"):
        mode.optimizer.step()
        mode.optimizer.zero_grad(set_to_none=True)


def profile_tables(prof: Any, steps: int, top: int = 20) -> str:
    """Ops by self CPU time, the ranges by total CPU time, and the GEMMs by shape, per step."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ranges = {"forward", "backward", "optimizer", "loss", *PASSES.values()}
    ops = sorted((e for e in events if e.key not in ranges), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    lines = [f"profiled CPU time per step: {total / 1000 / steps:.0f} ms", "",
             "| op (self CPU) | calls/step | ms/step | share |", "|---|---|---|---|"]
    lines += [f"| `{e.key}` | {e.count / steps:g} | {e.self_cpu_time_total / 1000 / steps:.1f} | {e.self_cpu_time_total / total:.1%} |"
              for e in ops]
    lines += ["", "| range (total CPU) | ms/step | share |", "|---|---|---|"]
    lines += [f"| {e.key} | {e.cpu_time_total / 1000 / steps:.1f} | {e.cpu_time_total / total:.1%} |"
              for e in sorted((e for e in events if e.key in ranges), key=lambda e: -e.cpu_time_total)]
    gemms = sorted((e for e in prof.key_averages(group_by_input_shape=True) if e.key in ("aten::mm", "aten::bmm", "aten::addmm")),
                   key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    lines += ["", "| GEMM | input shapes | calls/step | ms/step | GFLOP/s |", "|---|---|---|---|---|"]
    lines += [f"| `{e.key}` | {e.input_shapes} | {e.count / steps:g} | {e.self_cpu_time_total / 1000 / steps:.1f} | "
              f"{gemm_flops(e.key, e.input_shapes) * e.count / max(e.self_cpu_time_total, 1) / 1e3:.1f} |" for e in gemms]
    return "\n".join(lines)


def gemm_flops(op: str, shapes: list[list[int]]) -> int:
    """FLOPs of one mm / bmm / addmm call from its input shapes (addmm's bias first)."""
    a, b = shapes[1:3] if op == "aten::addmm" else shapes[:2]
    batch = a[0] if op == "aten::bmm" else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def profile(args: argparse.Namespace) -> None:
    """Where a cached stage-1 step's CPU time goes: torch.profiler over `args.profile` steps, by op,
    by pass (record_function ranges) and by GEMM shape."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_data(root, args.batch * (args.profile + 3))
        config = {"format": "jsonl", "paths": [str(data)], "num_workers": 0}
        build_cache(assembly(1, args.encoder_blocks, args.heads, args.qformer), [config], root / "cache",
                    BuildSettings(batch_size=args.batch, dtype=args.dtype, num_workers=0), random_weights=True)
        model = vlbridge.build(assembly(1, args.encoder_blocks, args.heads, args.qformer), stage=1, random_weights=True).train()
        set_dropout(model.connector, args.dropout)
        cached = feature_dataset(config, root / "cache", train=True, encoder=model.encoder, assembly=model.assembly)
        mode = Mode(1, "feature cache", model, cached, args.batch)
        label_passes(model.connector)
        ranged_step(mode)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(args.profile):
                ranged_step(mode)
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(profile_tables(prof, args.profile))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=positive, default=16, help="samples per step (default 16)")
    parser.add_argument("--steps", type=positive, default=3, help="steps per timed repetition (default 3)")
    parser.add_argument("--reps", type=positive, default=5, help="interleaved repetitions (default 5)")
    parser.add_argument("--threads", type=positive, default=1, help="torch threads (default 1)")
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="cache storage (default fp16)")
    parser.add_argument("--encoder-blocks", type=positive, default=12, help="encoder depth (default 12: 68%% of stage-1 FLOPs, as ViT-g)")
    parser.add_argument("--heads", type=positive, default=12, help="Q-Former attention heads (default 12, BLIP-2's count, "
                        "so 16 wide at this width; 3 gives BLIP-2's head width of 64: the same FLOPs in fewer, wider heads)")
    parser.add_argument("--qformer", choices=("mini", "blip2"), default="mini", help="Q-Former size: the bench's scaled-down "
                        "one (default) or BLIP-2's own (768 wide, 12 layers, heads of 64) on 1408-wide cached features; "
                        "blip2 times the cached stage-1 step only (its one-block encoder just fills the cache)")
    parser.add_argument("--dropout", type=probability, default=0.1, help="Q-Former dropout (default BLIP-2's 0.1; 0 to measure its cost)")
    parser.add_argument("--json", type=output_file, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--profile", type=at_least(0), default=0, metavar="STEPS", help="only profile this many cached stage-1 steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.profile:
        profile(args)
        return 0
    result = run(args)
    print_report(result)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLBRIDGE_LOAD_PLUGINS", "")
    sys.exit(main())
