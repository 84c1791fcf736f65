"""The fp32 GEMM rates this CPU gives torch's default path (MKL's sgemm) and oneDNN's kernels, at
the shapes that bound the other benches: a 2048^3 product (the "matmul rate" bench_train.py
divides by), the bench ViT's MLP over 4 images, and one decode step's MLP over 20 beams.

    python bench/probe_cpu_gemm.py [--threads 1] [--reps 20] [--json out.json]

GFLOP/s from process CPU time, median of `--reps` timed runs after a warm-up; each shape also says
whether oneDNN's result is bit-equal to torch's (it decides whether a bench that must keep outputs
identical to transformers can use it)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from bench_args import output_file, positive
from onednn_linear import available, pointwise

SHAPES = {"2048^3 product": (2048, 2048, 2048), "ViT MLP, 4 images (1028 x 384 -> 1536)": (1028, 384, 1536),
          "decode MLP, 20 beams (20 x 512 -> 2048)": (20, 512, 2048)}


def rate(run: Callable[[], torch.Tensor], flop: float, reps: int) -> float:
    run()
    seconds = []
    for _ in range(reps):
        start = time.process_time()
        run()
        seconds.append(time.process_time() - start)
    return flop / statistics.median(seconds) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=positive, default=1)
    parser.add_argument("--reps", type=positive, default=20)
    parser.add_argument("--json", type=output_file)
    args = parser.parse_args()
    if not available():
        print("probe_cpu_gemm: this torch has no oneDNN (mkldnn) linear op", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows = {}
    for name, (m, k, n) in SHAPES.items():
        x, weight = torch.randn(m, k, generator=generator), torch.randn(n, k, generator=generator) / k ** 0.5
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, m)
        flop = 2.0 * m * k * n
        rows[name] = {
            "torch_gflops": rate(lambda: F.linear(x, weight), flop, args.reps),
            "onednn_gflops": rate(lambda: pointwise(x, weight, None), flop, args.reps),
            "onednn_packed_gflops": rate(lambda: pointwise(x, packed, None), flop, args.reps),
            "onednn_bit_equal": torch.equal(F.linear(x, weight), pointwise(x, weight, None)),
            "onednn_max_abs_difference": (F.linear(x, weight) - pointwise(x, weight, None)).abs().max().item(),
        }
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                         f"capability {torch.backends.cpu.get_cpu_capability()}, threads {args.threads}",
              "shapes": rows}
    print(json.dumps(report, indent=2))
    if args.json:
        from vlbridge.files.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
