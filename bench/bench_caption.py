"""Captioning throughput: vlbridge against transformers' Blip2ForConditionalGeneration.generate on
this CPU, same weights (a random BLIP-2 saved with save_pretrained, imported with
vlbridge.import_hf_blip2), same images, same beams and lengths.

    python bench/bench_caption.py [--batch 4] [--beams 5] [--tokens 20] [--reps 3] [--threads 1] [--json out.json]
        [--ours-linear torch|onednn|onednn-packed]

The model is BLIP-2-shaped but small enough for a CPU: a 224 px, 257-token ViT (width 384, 6
blocks), a 6-layer Q-Former (width 256, 32 queries), a 6-layer OPT (width 512), its weights redrawn
wider than transformers' init (at that init every image's caption is one token repeated). Both sides
decode exactly `--tokens` new tokens (min = max) so the work is equal; the new token ids are checked
identical (exit 1 where they differ; this model's tokens mostly decode to U+FFFD or nothing, so equal
texts would prove little). `--ours-linear onednn` / `onednn-packed` is an experiment, not a vlbridge
setting: ours with its fp32 linears on oneDNN's kernels (bench/onednn_linear.py).

Time: median over `--reps` repetitions after a warm-up, as images/s, from the process's CPU time
with torch on `--threads` threads (default 1): on a shared machine wall time swings with other
jobs, CPU time of a one-thread process much less (wall time is reported too, and the load average
before and after). Each side runs in a fresh subprocess, both at the same time so both see the
same load from other jobs (they also share the caches and memory bandwidth: the side that moves
more memory loses more), or with --one-at-a-time one after the other. Memory: peak RSS during generation above the RSS before it (MALLOC_MMAP_THRESHOLD_
fixed so freed buffers go back to the OS), as in bench_qformer.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bench_args import output_file, positive

SEED = 0


def make_source(directory: Path) -> None:
    from transformers import AutoTokenizer, Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    from vlbridge.plugins.tiny_assets import tokenizer_dir

    vision = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6, image_size=224,
                  patch_size=14, initializer_range=0.02)
    qformer = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=1024,
                   encoder_hidden_size=384, vocab_size=1024)
    text = OPTConfig(vocab_size=1024, hidden_size=512, num_hidden_layers=6, num_attention_heads=8, ffn_dim=2048,
                     max_position_embeddings=128, word_embed_proj_dim=512).to_dict()
    torch.manual_seed(SEED)
    model = Blip2ForConditionalGeneration(Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                                                      num_query_tokens=32, image_token_index=1000))
    widen(model)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_dir("opt")).save_pretrained(directory)


def widen(model: torch.nn.Module, std: float = 0.15) -> None:
    """Redraw the weights (seeded) with `std`, norm scales near 1 and their biases near 0: at
    transformers' init (0.02) every image gets the same caption, one token repeated, so equal outputs
    on the two sides would not show that either read its image."""
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            if "norm" in name.lower():
                noise = noise / 10 + (1.0 if name.endswith("weight") else 0.0)
            param.copy_(noise)


def rss_kb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS"))


def peak_kb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM"))


def make_step(side: str, root: Path, args: argparse.Namespace) -> tuple[Any, Callable[[], list[list[int]]]]:
    """One side's model and a call that captions the bench's images with it (the new token ids per
    caption: ids, not texts, are compared, since many ids decode to the same text)."""
    pixels = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    settings = dict(num_beams=args.beams, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    if side == "ours":
        import vlbridge

        if getattr(args, "ours_linear", "torch") != "torch":
            import onednn_linear

            onednn_linear.install(packed=args.ours_linear == "onednn-packed")
        if getattr(args, "plain_cache", False):
            from vlbridge.plugins.llms import beam_cache

            beam_cache.share_prompt = lambda *given: False

        model = vlbridge.load(root / "ours")

        def step():
            return model.llm.generate(model.visual_tokens(pixels), *_bos(model, args.batch), **settings).tolist()
        return model, step
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(root / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "hf")
    ids = torch.tensor([[1000] * 32 + [tokenizer.bos_token_id]] * args.batch)
    eos = tokenizer("\n", add_special_tokens=False).input_ids[0]

    def step():
        out = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids), eos_token_id=eos, **settings)
        return out[:, ids.shape[1]:].tolist()
    return model, step


def run_side(side: str, root: Path, args: argparse.Namespace) -> dict:
    """In this process: load one side, generate `reps` times, report times, tokens and memory."""
    torch.set_num_threads(args.threads)
    _, step = make_step(side, root, args)
    with torch.inference_mode():
        tokens = step()  # warm-up
        before = rss_kb()
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark
        times, walls = [], []
        for _ in range(args.reps):
            start, wall = time.process_time(), time.perf_counter()
            step()
            times.append(time.process_time() - start)
            walls.append(time.perf_counter() - wall)
    return {"times": times, "walls": walls, "tokens": tokens, "peak_delta_mb": (peak_kb() - before) / 1024}


def _bos(model, batch: int):
    ids, mask = model.llm.tokenize([""] * batch, padding_side="left")
    return ids, mask


def _result(side: str, run: subprocess.Popen) -> dict:
    out, err = run.communicate()
    if run.returncode:
        raise SystemExit(f"the {side} side failed:\n{err}")
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=positive, default=4)
    parser.add_argument("--beams", type=positive, default=5)
    parser.add_argument("--tokens", type=positive, default=20)
    parser.add_argument("--reps", type=positive, default=3)
    parser.add_argument("--threads", type=positive, default=1)
    parser.add_argument("--json", type=output_file)
    parser.add_argument("--default-malloc", action="store_true", help="glibc's own mmap threshold (the peak-memory "
                        "figures are then not comparable: freed buffers may stay in the heap)")
    parser.add_argument("--plain-cache", action="store_true", help="ours with the prompt's cache copied to every beam "
                        "in a DynamicCache (the path before issue 21's shared-prompt cache)")
    parser.add_argument("--ours-linear", choices=("torch", "onednn", "onednn-packed"), default="torch",
                        help="an experiment: ours with fp32 linears on oneDNN's kernels (bench/onednn_linear.py), whose "
                        "sums are ordered differently from torch's, so the captions may differ")
    parser.add_argument("--one-at-a-time", action="store_true", help="run the sides one after the other, not side by side")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.root, args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_source(root / "hf")
        import vlbridge

        vlbridge.import_hf_blip2(root / "hf", root / "ours")
        env = dict(os.environ) if args.default_malloc else {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        load_before = os.getloadavg()[0]
        runs = {}
        for side in ("transformers", "ours"):  # side by side unless --one-at-a-time
            cmd = [sys.executable, __file__, "--side", side, "--root", str(root), "--batch", str(args.batch),
                   "--beams", str(args.beams), "--tokens", str(args.tokens), "--reps", str(args.reps), "--threads", str(args.threads)]
            cmd += ["--plain-cache"] if args.plain_cache else []
            cmd += ["--ours-linear", args.ours_linear]
            runs[side] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            if args.one_at_a_time:
                runs[side] = _result(side, runs[side])
        results = {side: run if isinstance(run, dict) else _result(side, run) for side, run in runs.items()}
        load_after = os.getloadavg()[0]
    same = results["ours"]["tokens"] == results["transformers"]["tokens"]
    med = {side: statistics.median(r["times"]) for side, r in results.items()}
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {args.threads}",
        "settings": {"batch": args.batch, "beams": args.beams, "new_tokens": args.tokens, "reps": args.reps,
                     "side_by_side": not args.one_at_a_time, "fixed_mmap_threshold": not args.default_malloc,
                     "ours_cache": "plain" if args.plain_cache else "shared prompt", "ours_linear": args.ours_linear},
        "identical_captions": same,
        "images_per_cpu_s": {side: args.batch / t for side, t in med.items()},
        "images_per_wall_s": {side: args.batch / statistics.median(r["walls"]) for side, r in results.items()},
        "throughput_ratio_ours_over_transformers": med["transformers"] / med["ours"],
        "peak_delta_mb": {side: r["peak_delta_mb"] for side, r in results.items()},
        "load_average_1min": {"before": load_before, "after": load_after},
    }
    print(json.dumps(report, indent=2))
    if args.json:
        from vlbridge.files.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(report, indent=2))
    if not same:
        print("bench_caption: the two sides generated different tokens, so they did different work", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
