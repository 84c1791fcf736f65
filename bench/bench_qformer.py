"""Our Q-Former against transformers' Blip2QFormerModel on this CPU: same weights, same inputs.

    python bench/bench_qformer.py [--batch 8] [--reps 5] [--json out.json]

Both sides run BLIP-2's query path: ln_vision (transformers: vision_model.post_layernorm) on a
(B, 257, 1408) encoder output, then the Q-Former over 32 learned queries (base: 768 wide, 12 layers,
cross-attention every 2nd). Weights come from one seeded vlbridge build, converted with
`qformer_convert.to_transformers`; outputs are checked equal before timing.

Time: median of `--reps` interleaved repetitions (after one warm-up) of a forward (eval, no_grad)
and of a training step (train mode: dropout on; forward, mean-square loss, backward).

Memory: each side runs in a fresh subprocess with MALLOC_MMAP_THRESHOLD_ fixed, so that large
buffers are mmapped and returned to the OS on free and RSS follows live memory. After a warm-up
step, the peak-RSS mark is reset (/proc/self/clear_refs) and the step's peak RSS above the RSS
before it is reported: activations, gradients and temporaries, not the weights. The weights
resident in each module are reported separately; our side runs as in stage 2, with
`drop_text_side()` (a full stage-1 Q-Former also holds the text side: about 80M more parameters).
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
import time
from typing import Callable

import torch
from torch import nn

ENCODER_TOKENS, ENCODER_WIDTH, LLM_WIDTH = 257, 1408, 2560
SEED = 0


def build_pair(side: str) -> nn.Module:
    """One side, with the seeded weights: 'ours' (vlbridge) or 'transformers'."""
    from vlbridge.plugins.connectors.qformer import QFormerOptions
    from vlbridge.plugins.connectors.qformer_model import build
    from vlbridge.specs import TokenShape

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
        query_path = {n: p.detach() for n, p in ours.named_parameters() if p.requires_grad and not n.startswith("proj.")}
        theirs = {k.replace("vision_model.post_layernorm.", "post_layernorm."): v for k, v in to_transformers(query_path).items()}
        self.load_state_dict(theirs, strict=True)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=self.post_layernorm(image_embeds))
        return out.last_hidden_state


def run_query_path(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    return model.query_outputs(image) if hasattr(model, "query_outputs") else model(image)


def forward_only(model: nn.Module, image: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        run_query_path(model, image)


def train_step(model: nn.Module, image: torch.Tensor) -> None:
    model.train()
    run_query_path(model, image).pow(2).mean().backward()
    model.zero_grad(set_to_none=True)


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


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


def measure_memory(side: str, batch: int) -> dict[str, float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--memory-child", side, "--batch", str(batch)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(batch: int, reps: int) -> dict[str, object]:
    ours, theirs, image = build_pair("ours"), build_pair("transformers"), make_image(batch)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        max_diff = (run_query_path(ours, image) - run_query_path(theirs, image)).abs().max().item()
    times: dict[str, list[float]] = {f"{s}_{m}": [] for s in ("ours", "transformers") for m in ("forward", "train_step")}
    for rep in range(reps + 1):  # rep 0 is the warm-up
        for mode, step in (("forward", forward_only), ("train_step", train_step)):
            for side, model in (("ours", ours), ("transformers", theirs)):
                elapsed = timed(lambda: step(model, image))
                if rep:
                    times[f"{side}_{mode}"].append(elapsed)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"max_abs_diff": max_diff, "median_s": medians, "all_s": times}


def report(batch: int, reps: int, result: dict, memory: dict[str, dict[str, float]]) -> str:
    med = result["median_s"]
    rows = [
        ("forward (eval, no_grad), median s", med["ours_forward"], med["transformers_forward"]),
        ("training step (fwd+bwd), median s", med["ours_train_step"], med["transformers_train_step"]),
        ("forward: peak RSS above weights, MiB", memory["ours"]["forward_peak_mb"], memory["transformers"]["forward_peak_mb"]),
        ("training step: peak RSS above weights, MiB", memory["ours"]["train_step_peak_mb"], memory["transformers"]["train_step_peak_mb"]),
        ("weights resident in the module, MiB", memory["ours"]["weights_mb"], memory["transformers"]["weights_mb"]),
    ]
    lines = [
        f"Q-Former base, batch {batch}, encoder output {ENCODER_TOKENS}x{ENCODER_WIDTH}, fp32, {reps} reps after 1 warm-up",
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
        f"torch {torch.__version__}, transformers {__import__('transformers').__version__}",
        f"max |ours - transformers| on the query outputs: {result['max_abs_diff']:.2e}",
        "",
        "| measure | vlbridge | transformers | vlbridge / transformers |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {a:.3f} | {b:.3f} | {a / b:.3f} |" for name, a, b in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", help="also write the raw numbers here")
    parser.add_argument("--memory-child", choices=("ours", "transformers"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.batch)))
        return
    memory = {side: measure_memory(side, args.batch) for side in ("ours", "transformers")}
    result = compare(args.batch, args.reps)
    print(report(args.batch, args.reps, result, memory))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"batch": args.batch, "reps": args.reps, **result, "memory": memory}, out, indent=2)


if __name__ == "__main__":
    main()
