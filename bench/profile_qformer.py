"""Where the Q-Former's time goes: torch.profiler on ours and transformers' side by side.

    python bench/profile_qformer.py [--batch 4] [--threads 1] [--reps 3] [--top 12]

Same models and weights as bench_qformer.py (BLIP-2 size: 32 queries x 257 image tokens of width
1408, Q-Former base, projection to 2560). Each part's forward runs inside a `record_function`
range named after it (ln_vision, self_attn, cross_attn, ffn, proj), so the table shows what each
part costs on each side; backward ops are listed by op name (the autograd engine runs them outside
the ranges). Profiles a forward (eval, no_grad) and a training step (forward, loss, backward).
"""

from __future__ import annotations

import argparse
import functools
import re
from typing import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from bench_args import positive
from bench_qformer import build_pair, forward_only, make_image, train_step

# Which submodules get a range: the last name of the module -> (part, the methods that run it).
Parts = dict[str, tuple[str, tuple[str, ...]]]
OURS_PARTS: Parts = {"ln_vision": ("ln_vision", ("forward",)), "self_attn": ("self_attn", ("key_values", "attend")),
                     "cross_attn": ("cross_attn", ("forward", "attend_folded")), "ffn_query": ("ffn", ("forward",)),
                     "proj": ("proj", ("forward",))}
HF_PARTS: Parts = {"post_layernorm": ("ln_vision", ("forward",)), "crossattention": ("cross_attn", ("forward",)),
                   "intermediate_query": ("ffn", ("forward",)), "output_query": ("ffn", ("forward",)),
                   "language_projection": ("proj", ("forward",))}


def label_parts(model: nn.Module, parts: Parts, side: str) -> None:
    """Wrap each named part's methods in a record_function range '<side>.<part>'."""
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if re.search(r"encoder\.layer\.\d+\.attention$", name):  # transformers' self-attention block
            part, methods = "self_attn", ("forward",)
        elif last in parts:
            part, methods = parts[last]
        else:
            continue
        for method in methods:
            setattr(module, method, _ranged(getattr(module, method), f"{side}.{part}"))


def _ranged(fn: Callable, label: str) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return wrapper


def profile_step(step: Callable[[nn.Module, torch.Tensor], None], model: nn.Module, image: torch.Tensor, reps: int) -> profile:
    step(model, image)  # warm-up outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            step(model, image)
    return prof


def table(prof: profile, top: int, reps: int) -> str:
    """The top ops and ranges by self CPU time (ms per step) and by total CPU time."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    lines = ["| op (self time) | calls/step | self ms/step | share |", "|---|---|---|---|"]
    lines += [f"| {e.key} | {e.count // reps} | {e.self_cpu_time_total / 1000 / reps:.1f} | {e.self_cpu_time_total / total:.1%} |" for e in rows]
    ranges = sorted((e for e in events if "." in e.key and e.key.split(".")[0] in ("ours", "hf")), key=lambda e: e.key)
    lines += ["", "| part (forward range, total time) | calls/step | ms/step | share |", "|---|---|---|---|"]
    lines += [f"| {e.key} | {e.count // reps} | {e.cpu_time_total / 1000 / reps:.1f} | {e.cpu_time_total / total:.1%} |" for e in ranges]
    lines.append(f"\nprofiled CPU time per step: {total / 1000 / reps:.1f} ms")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=positive, default=4)
    parser.add_argument("--threads", type=positive, default=1)
    parser.add_argument("--reps", type=positive, default=3)
    parser.add_argument("--top", type=positive, default=12)
    parser.add_argument("--projected", action="store_true", help="ours without folding (the path before issue 21)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.projected:
        from vlbridge.plugins.connectors import qformer_layers

        qformer_layers.folding_pays = lambda *sizes: False
    ours, theirs, image = build_pair("ours"), build_pair("transformers"), make_image(args.batch)
    label_parts(ours, OURS_PARTS, "ours")
    label_parts(theirs, HF_PARTS, "hf")
    print(f"# Q-Former profile: batch {args.batch}, {args.threads} thread(s), {args.reps} steps each, "
          f"{'projected' if args.projected else 'folded'} cross-attention, torch {torch.__version__}")
    for mode, step in (("forward", forward_only), ("training step", train_step)):
        for side, model in (("vlbridge", ours), ("transformers", theirs)):
            print(f"\n## {mode}, {side}\n")
            print(table(profile_step(step, model, image, args.reps), args.top, args.reps))


if __name__ == "__main__":
    main()
