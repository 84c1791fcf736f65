"""GPU check of the attention backends on the Q-Former: xformers against SDPA, and their speed.

    python bench/gpu_check.py [--batch 64] [--reps 10] [--out gpu_check.json]

Q-Former base (768 wide, 12 layers, 32 queries) on a (B, 257, 1408) encoder output in bf16.
For each backend (xformers, sdpa, eager): the query path (no mask, stage 2) and the ITG pass
(multimodal-causal mask with text padding, the tensor-bias path of xformers) are run in eval mode
and compared with SDPA (the query path's cross-attention reads the image folded, `attend_folded`,
with plain batched matmuls: there the backends differ in the self-attention only): max abs difference of outputs and of all parameter gradients (also relative
to SDPA's largest gradient). Then the median time of a forward (no_grad) and of a forward+backward
of the query path (train mode), and peak CUDA memory. Without CUDA it says so and exits 0.
Exits 1 if xformers fails or differs from SDPA beyond bf16 tolerance.
With 2 or more GPUs it also trains tiny-mlp-opt stage 2 under FSDP2 (parallel.strategy: fsdp, bf16,
torchrun --nproc_per_node 2, NCCL) for 4 steps and exits 1 if that run fails or logs a non-finite loss.
`--device cpu --variant tiny` dry-runs the script itself on a CPU (xformers then shows as failed).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from typing import Callable

import torch

from bench_args import output_file, positive

ENCODER_TOKENS, ENCODER_WIDTH, LLM_WIDTH, TEXT_LEN = 257, 1408, 2560, 32
BACKENDS = ("sdpa", "xformers", "eager")
REL_TOLERANCE = 5e-2  # bf16: differences relative to the largest SDPA value


def build_model(variant: str, device: str) -> torch.nn.Module:
    from vlbridge.plugins.connectors.qformer import QFormerOptions
    from vlbridge.plugins.connectors.qformer_model import build
    from vlbridge.plugin.specs import TokenShape

    torch.manual_seed(0)
    model = build(QFormerOptions(variant=variant), TokenShape(ENCODER_TOKENS, ENCODER_WIDTH), LLM_WIDTH)
    model.set_stage(1)
    model.requires_grad_(True)  # proj too: every gradient is compared
    return model.to(device, torch.bfloat16)


def make_inputs(batch: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(5, vocab, (batch, TEXT_LEN), device=device, generator=gen)
    lengths = torch.randint(4, TEXT_LEN + 1, (batch,), device=device, generator=gen)
    mask = (torch.arange(TEXT_LEN, device=device)[None] < lengths[:, None]).long()
    image = torch.randn(batch, ENCODER_TOKENS, ENCODER_WIDTH, device=device, generator=gen).to(torch.bfloat16)
    return {"image": image, "ids": ids, "mask": mask}


def outputs_and_grads(model, inputs, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One eval-mode pass and its backward: (output, all parameter gradients flattened)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    if which == "query":
        out = model(inputs["image"])
    else:
        out = model.itg_logits(inputs["ids"], inputs["mask"], inputs["image"])
    out.float().pow(2).mean().backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    return out.detach().float(), grads


def compare(model, inputs, backend: str, reference: dict) -> dict[str, float]:
    from vlbridge.parts.attention import set_attention_backend

    set_attention_backend(backend)
    result = {}
    for which in ("query", "itg"):
        out, grads = outputs_and_grads(model, inputs, which)
        ref_out, ref_grads = reference[which]
        result[f"{which}_out_max_abs"] = (out - ref_out).abs().max().item()
        result[f"{which}_out_rel"] = result[f"{which}_out_max_abs"] / ref_out.abs().max().item()
        result[f"{which}_grad_max_abs"] = (grads - ref_grads).abs().max().item()
        result[f"{which}_grad_rel"] = result[f"{which}_grad_max_abs"] / ref_grads.abs().max().item()
    return result


def median_ms(fn: Callable[[], None], reps: int, cuda: bool) -> float:
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def timings(model, image: torch.Tensor, reps: int) -> dict[str, float]:
    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(image)

    def train_step() -> None:
        model.train()
        model(image).float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    cuda = image.is_cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = {"forward_ms": median_ms(forward, reps, cuda), "train_step_ms": median_ms(train_step, reps, cuda)}
    result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return result


def run(batch: int, reps: int, variant: str, device: str) -> dict:
    from vlbridge.parts.attention import set_attention_backend

    model = build_model(variant, device)
    inputs = make_inputs(batch, model.opts.size("vocab_size"), device)
    set_attention_backend("sdpa")
    reference = {which: outputs_and_grads(model, inputs, which) for which in ("query", "itg")}
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else device
    report: dict = {"device": name, "variant": variant, "torch": torch.__version__, "batch": batch, "backends": {}}
    for backend in BACKENDS:
        try:
            entry = compare(model, inputs, backend, reference) if backend != "sdpa" else {}
            entry.update(timings(model, inputs["image"], reps))
        except Exception as exc:  # report and go on: the table shows which backend failed and why
            entry = {"error": f"{type(exc).__name__}: {exc}"}
        report["backends"][backend] = entry
    set_attention_backend(None)
    return report


def print_table(report: dict) -> None:
    print(f"Q-Former {report['variant']}, bf16, batch {report['batch']}, encoder {ENCODER_TOKENS}x{ENCODER_WIDTH}, "
          f"{report['device']}, torch {report['torch']}")
    print(f"{'backend':9} {'fwd ms':>8} {'fwd+bwd ms':>11} {'peak GiB':>9} {'query out/grad rel diff':>24} {'itg out/grad rel diff':>22}")
    for name, e in report["backends"].items():
        if "error" in e:
            print(f"{name:9} FAILED: {e['error']}")
            continue
        diffs = [f"{e[k]:.1e}" if k in e else "ref" for k in ("query_out_rel", "query_grad_rel", "itg_out_rel", "itg_grad_rel")]
        peak = "-" if e["peak_mem_gib"] is None else f"{e['peak_mem_gib']:.2f}"
        print(f"{name:9} {e['forward_ms']:8.2f} {e['train_step_ms']:11.2f} {peak:>9} "
              f"{diffs[0] + ' / ' + diffs[1]:>24} {diffs[2] + ' / ' + diffs[3]:>22}")


def xformers_ok(report: dict) -> bool:
    entry = report["backends"].get("xformers", {})
    rel = [v for k, v in entry.items() if k.endswith("_rel")]
    return "error" not in entry and bool(rel) and max(rel) < REL_TOLERANCE


def fsdp_case() -> dict:
    """Two GPUs, FSDP2 on the frozen LLM and encoder: the trainer end to end under torchrun (NCCL)."""
    import subprocess
    import tempfile
    from pathlib import Path

    import yaml

    if torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU(s); FSDP needs 2"}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, bench/ is on the path, not the root
    from tests.test_trainer_samples import config, read_metrics, write_caption_data

    root = Path(tempfile.mkdtemp(prefix="gpu_check_fsdp_"))
    values = config(write_caption_data(root / "data"), root / "run", assembly="tiny-mlp-opt", stage=2, steps=4, log_every=1,
                    schedule={}, precision="bf16", device="cuda", parallel={"strategy": "fsdp"})
    (root / "train.yaml").write_text(yaml.safe_dump(values), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "vlbridge", "train",
                           str(root / "train.yaml")], capture_output=True, text=True)
    losses = [m["loss"] for m in read_metrics(root / "run")] if done.returncode == 0 else []
    ok = done.returncode == 0 and len(losses) == 4 and all(loss == loss and abs(loss) != float("inf") for loss in losses)
    return {"ok": ok, "losses": losses, **({} if ok else {"stderr": done.stderr[-2000:]})}


def device_setting(text: str) -> str:
    """An argparse type: cuda, cuda:N, or cpu (the dry run). 'cuda:0' on a machine without CUDA used
    to die in torch's CUDA init instead of saying there is nothing to check."""
    if text in ("cuda", "cpu") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"must be cuda, cuda:N, or cpu (a dry run of the script); got {text!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=positive, default=64)
    parser.add_argument("--reps", type=positive, default=10)
    parser.add_argument("--out", type=output_file, help="write the results as JSON here (default: stdout table only)")
    parser.add_argument("--variant", choices=("base", "tiny"), default="base")
    parser.add_argument("--device", type=device_setting, default="cuda", help="cuda, cuda:N, or cpu only to dry-run this script")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (run it on a machine with a GPU).")
        return 0
    if args.device.startswith("cuda:") and int(args.device[5:]) >= torch.cuda.device_count():
        parser.error(f"argument --device: {args.device} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    report = run(args.batch, args.reps, args.variant, args.device)
    report["xformers_matches_sdpa"] = xformers_ok(report)
    report["fsdp"] = fsdp_case()
    print_table(report)
    print(f"xformers matches SDPA within {REL_TOLERANCE:g} (relative): {report['xformers_matches_sdpa']}")
    print(f"fsdp on 2 GPUs: {report['fsdp']}")
    if args.out:
        from vlbridge.files.atomic import atomic_write_text

        atomic_write_text(args.out, json.dumps(report, indent=2))
    return 0 if report["xformers_matches_sdpa"] and report["fsdp"].get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
