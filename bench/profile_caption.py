"""Where captioning's time goes: torch.profiler on vlbridge and transformers' BLIP-2 generate.

    python bench/profile_caption.py [--batch 4] [--beams 5] [--tokens 20] [--threads 1] [--reps 2] [--top 12]

Same model, weights and settings as bench_caption.py. Each part runs inside a `record_function`
range, so the table shows what it costs on each side: `encoder`, `qformer` (connector and
projection), `prefill` (the LLM's first forward over the prompt), `decode` (every later LLM
forward, one per new token), `cache_reorder` (the KV cache following the surviving beams),
`logits_processing` (min-length, repetition... processors) and `generate` (the whole search: what
it holds beyond the ranges inside it is beam bookkeeping and Python).

The op table is the profiler's (wall time of each op: on a loaded machine it counts the time the
process waited). The parts table is the process's CPU time spent in each range (time.process_time
around it), which other jobs inflate only through shared caches and memory bandwidth.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench_args import positive
from bench_caption import make_source, make_step

PARTS = ("encoder", "qformer", "prefill", "decode", "cache_reorder", "logits_processing", "generate")
CPU_SECONDS: collections.Counter = collections.Counter()  # range -> process CPU seconds inside it
CALLS: collections.Counter = collections.Counter()


def _ranged(fn: Callable, label: str | Callable[..., str]) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        name = label(*args, **kwargs) if callable(label) else label
        start = time.process_time()
        with record_function(name):
            out = fn(*args, **kwargs)
        CPU_SECONDS[name] += time.process_time() - start
        CALLS[name] += 1
        return out
    return wrapper


def _llm_label(*args: Any, **kwargs: Any) -> str:
    """'prefill' for a forward over more than one position, else 'decode'."""
    given = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs.get("input_ids")
    return "prefill" if given is not None and given.shape[1] > 1 else "decode"


def label_shared_parts() -> None:
    """Wrap the cache reorder and the logits processors, which both sides share, in their ranges (once)."""
    from transformers import LogitsProcessorList
    from transformers.cache_utils import DynamicCache

    DynamicCache.reorder_cache = _ranged(DynamicCache.reorder_cache, "cache_reorder")
    LogitsProcessorList.__call__ = _ranged(LogitsProcessorList.__call__, "logits_processing")


def label_parts(side: str, model: Any) -> None:
    """Wrap each part of one side in its range (instance methods, so the other side is untouched)."""
    if side == "ours":
        parts = {"encoder": model.encoder, "qformer": model.connector, "llm": model.llm.model}
    else:
        parts = {"encoder": model.vision_model, "qformer": model.qformer, "projection": model.language_projection,
                 "llm": model.language_model}
    for name, module in parts.items():
        label = _llm_label if name == "llm" else ("qformer" if name == "projection" else name)
        module.forward = _ranged(module.forward, label)
    generator = model.llm.model if side == "ours" else model
    generator.generate = _ranged(generator.generate, "generate")


def markdown(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def table(prof: profile, top: int, reps: int, step_seconds: float) -> str:
    """The top ops by self time (profiler) and the parts' process CPU time, in ms per caption call."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    lines = markdown(("op (self time)", "calls/step", "self ms/step", "share"),
                     [(e.key, e.count // reps, f"{e.self_cpu_time_total / 1000 / reps:.1f}", f"{e.self_cpu_time_total / total:.1%}")
                      for e in ops])
    lines += [""] + markdown(("part (range)", "calls/step", "CPU ms/step", "share"),
                             [(key, CALLS[key] // reps, f"{CPU_SECONDS[key] * 1000 / reps:.1f}", f"{CPU_SECONDS[key] / step_seconds:.1%}")
                              for key in PARTS if key in CALLS])
    lines.append(f"\nprocess CPU time per step: {step_seconds * 1000 / reps:.1f} ms; profiled op time per step: {total / 1000 / reps:.1f} ms")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=positive, default=4)
    parser.add_argument("--beams", type=positive, default=5)
    parser.add_argument("--tokens", type=positive, default=20)
    parser.add_argument("--threads", type=positive, default=1)
    parser.add_argument("--reps", type=positive, default=2)
    parser.add_argument("--top", type=positive, default=12)
    parser.add_argument("--side", choices=("ours", "transformers"), help="profile one side only")
    parser.add_argument("--plain-cache", action="store_true", help="ours with the shared prompt copied to every beam "
                        "in a DynamicCache (the path before issue 21)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# Captioning profile: batch {args.batch}, {args.beams} beams, {args.tokens} new tokens, "
          f"{args.threads} thread(s), {args.reps} calls each, {'plain' if args.plain_cache else 'shared-prompt'} cache, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_source(root / "hf")
        import vlbridge

        vlbridge.import_hf_blip2(root / "hf", root / "ours")
        label_shared_parts()
        for side in (args.side,) if args.side else ("transformers", "ours"):
            model, step = make_step(side, root, args)
            label_parts(side, model)
            with torch.inference_mode():
                step()  # warm-up outside the profile
                CPU_SECONDS.clear()
                CALLS.clear()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    start = time.process_time()
                    for _ in range(args.reps):
                        step()
                    seconds = time.process_time() - start
            print(f"\n## {side}\n")
            print(table(prof, args.top, args.reps, seconds))


if __name__ == "__main__":
    main()
