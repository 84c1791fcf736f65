"""Does a stage-1 start help or hurt stage 2, and why? The measurements behind docs/demo-findings.md.

    python bench/stage1_handover.py --out runs/handover                       # 600 stage-1, 800 stage-2 steps
    python bench/stage1_handover.py --out /tmp/h --stage1-steps 4 --stage2-steps 4 --train 64   # seconds

On the demo's world and presets (world-qformer-opt, 32 queries, batch 32, frozen-feature cache),
stage 2 is trained with captions only (BLIP-2's stage-2 data): from the stage-1 weights
and from the BERT init, each with the demo's recipe (peak lr 2e-3, warm-up 10%, weight decay 0.05)
with LAVIS's (peak lr 1e-4 from 1e-6 over 10% warm-up, cosine to 1e-5, weight decay 0.05), and
with a middle peak lr of 5e-4 (otherwise the demo's).
For each start and end it reports:

- what trains in each stage (parameter names by group) and which modules are in training mode;
- the L2 norm of the query outputs, of the soft prompt the LLM reads, and of the LLM's own token
  embeddings (a soft prompt at a scale the frozen LLM never saw would be hard for it to read);
- the image dependence of the soft prompt (spread across images / spread across query positions);
- the stage-2 loss curve (metrics.jsonl), to tell a slower start from a lower plateau;
- the held-out caption loss (mean LM loss on test-split captions).

Writes OUT/handover.json and prints a markdown summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import vlbridge
from vlbridge.files.atomic import atomic_write_text
from vlbridge.train import run as train

from bench_args import output_folder, positive

PRESET = "world-qformer-opt"
RECIPES: dict[str, dict[str, Any]] = {
    "demo": {"optimizer": {"lr": 2e-3, "weight_decay": 0.05}, "schedule": {"warmup_fraction": 0.1}},
    "mid": {"optimizer": {"lr": 5e-4, "weight_decay": 0.05}, "schedule": {"warmup_fraction": 0.1}},
    "lavis": {"optimizer": {"lr": 1e-4, "weight_decay": 0.05, "betas": [0.9, 0.999]},
              "schedule": {"warmup_fraction": 0.1, "warmup_lr": 1e-6, "min_lr": 1e-5}},
}


PARTS: Path | None = None  # --parts: another folder of world parts instead of the shipped one


def assembly() -> dict[str, Any]:
    """The demo's Q-Former assembly (32 queries), on --parts when given."""
    from vlbridge.plugin.resources import shipped_folders

    text = json.dumps(vlbridge.load_assembly(PRESET).config.model_dump(mode="json"))
    if PARTS is not None:
        text = text.replace(json.dumps(shipped_folders()["world"])[1:-1], json.dumps(str(PARTS.resolve()))[1:-1])
    body = json.loads(text)
    body["connector"]["options"] = {**body["connector"]["options"], "num_query_tokens": 32}
    return body


def train_config(out: Path, stage: int, steps: int, features: Path, captions: Path, world: Path, recipe: dict[str, Any],
                 init_from: Path | None, seed: int) -> dict[str, Any]:
    schedule = dict(recipe["schedule"])
    warmup = max(1, int(schedule.pop("warmup_fraction") * steps))
    return {
        "assembly": assembly(), "stage": stage, "init_from": str(init_from) if init_from else None, "steps": steps, "seed": seed,
        "data": {"train": {"format": "coco", "paths": [str(captions)], "image_root": str(world)}, "features": str(features)},
        "batch_size": 32, "optimizer": recipe["optimizer"], "schedule": {"warmup_steps": min(warmup, steps - 1), **schedule},
        "output_dir": str(out), "log_every": max(1, steps // 20), "device": "cpu", "tensorboard": False,
        **({"objective": {"max_text_tokens": 24}} if stage == 1 else {"prompt": ""}),
    }


def trainable_groups(model) -> dict[str, list[str]]:
    """Trainable connector parameters grouped by their first two name parts (readable and short)."""
    groups: dict[str, int] = {}
    for name, param in model.connector.named_parameters():
        if param.requires_grad:
            key = ".".join(p for p in name.split(".")[:3] if not p.isdigit())
            groups[key] = groups.get(key, 0) + param.numel()
    frozen_outside = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("connector.")]
    return {"trainable": sorted(groups), "trainable_outside_connector": frozen_outside}


def modes(model) -> dict[str, bool]:
    """Which parts are in training mode once the model is put in training mode (as the trainer does)."""
    model.train()
    state = {"connector": model.connector.training, "encoder": model.encoder.training, "llm": model.llm.training if model.llm else None,
             "llm_modules_training": sum(m.training for m in model.llm.modules()) if model.llm else None}
    model.eval()
    return state


@torch.no_grad()
def scales(model, features: torch.Tensor) -> dict[str, float]:
    """Norms of the query outputs, the soft prompt and the LLM's own token embeddings; image dependence."""
    qformer = model.connector
    queries = qformer.query_outputs(features)  # (B, Q, W)
    prompt = model.visual_tokens(image_embeds=features)  # (B, Q, D)
    table = model.llm.model.get_input_embeddings().weight.float()
    across_images = prompt.std(dim=0).mean().item()
    across_queries = prompt.std(dim=1).mean().item()
    return {"query_output_norm": queries.norm(dim=-1).mean().item(), "soft_prompt_norm": prompt.norm(dim=-1).mean().item(),
            "llm_token_embedding_norm": table.norm(dim=-1).mean().item(),
            "image_dependence": across_images / max(across_queries, 1e-9)}


@torch.no_grad()
def caption_loss(model, features: torch.Tensor, captions: list[str]) -> float:
    """Mean LM loss on held-out captions (one per image), in eval mode."""
    from vlbridge.train.objectives import Stage2Objective

    model.eval()
    losses = Stage2Objective()(model, {"image_embeds": features, "text": captions})
    return losses["lm"].item()


def held_out(world: Path, assembly_body: dict[str, Any], count: int) -> tuple[torch.Tensor, list[str]]:
    """Encoder tokens and the first caption of `count` test images."""
    from vlbridge.parts.images import load_image

    records = json.loads((world / "captions_test.json").read_text(encoding="utf-8"))[:count]
    encoder_model = vlbridge.build(assembly_body, stage=1)
    pixels = encoder_model.pixel_values([load_image(world / r["image"]) for r in records])
    return encoder_model.encode_images(pixels), [r["caption"][1] for r in records]  # [1]: the inventory caption


def curve(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [(m["step"], round(m["loss"], 4)) for m in map(json.loads, lines) if "loss" in m]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=output_folder, required=True)
    parser.add_argument("--stage1-steps", type=positive, default=600)
    parser.add_argument("--stage2-steps", type=positive, default=800)
    parser.add_argument("--train", type=positive, default=3000, help="training images of the world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=list(RECIPES), help="stage-2 recipes to run")
    parser.add_argument("--parts", type=Path, default=None, help="a folder of world parts (train_parts' layout); default: the shipped ones")
    args = parser.parse_args()
    global PARTS
    PARTS = args.parts

    from vlbridge.train.cache_build import build_cache
    from vlbridge.train.cache import read_manifest
    from vlbridge.world import WorldConfig, generate_world

    torch.set_num_threads(1)
    out = args.out
    world = out / "world"
    if not (world / "manifest.json").is_file():
        generate_world(world, WorldConfig(train=args.train, val=8, test=64, comp=0))
    captions = world / "captions_train.json"
    features = out / "features"
    body = assembly()
    try:
        read_manifest(features)
    except Exception:
        build_cache(body, [{"format": "coco", "paths": [str(captions)], "image_root": str(world)}], features)
    test_features, test_captions = held_out(world, body, 64)

    report: dict[str, Any] = {"preset": PRESET, "stage1_steps": args.stage1_steps, "stage2_steps": args.stage2_steps, "runs": {}}
    started = time.perf_counter()
    stage1_dir = out / "stage1"
    train(train_config(stage1_dir, 1, args.stage1_steps, features, captions, world, RECIPES["demo"], None, args.seed), resume=True)
    report["stage1_curve"] = curve(stage1_dir)
    for recipe in args.recipes:
        for start in ("stage1", "bert"):
            name = f"{start}-{recipe}"
            init = stage1_dir if start == "stage1" else None
            begin = vlbridge.build(body, stage=2, weights=_checkpoint(stage1_dir) if init else None)
            entry: dict[str, Any] = {"at_start": scales(begin, test_features), "trainable": trainable_groups(begin), "modes": modes(begin)}
            run_dir = out / name
            train(train_config(run_dir, 2, args.stage2_steps, features, captions, world, RECIPES[recipe], init, args.seed), resume=True)
            end = vlbridge.load(_checkpoint(run_dir))
            entry.update(at_end=scales(end, test_features), held_out_caption_loss=caption_loss(end, test_features, test_captions),
                         curve=curve(run_dir))
            report["runs"][name] = entry
            print(f"{name}: {json.dumps({k: entry[k] for k in ('at_start', 'at_end', 'held_out_caption_loss')})}", flush=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_text(out / "handover.json", json.dumps(report, indent=1))
    print(summary(report))


def _checkpoint(run_dir: Path) -> Path:
    from vlbridge.train.checkpointing import latest_checkpoint

    found = latest_checkpoint(run_dir)
    if found is None:
        raise SystemExit(f"no checkpoint under {run_dir}")
    return found


def summary(report: dict[str, Any]) -> str:
    lines = ["| stage 2 run | query norm start / end | soft prompt norm start / end | LLM token norm | image dependence start / end "
             "| loss at 10% / 50% / end | held-out caption loss |", "|---|---|---|---|---|---|---|"]
    for name, e in report["runs"].items():
        s, t, c = e["at_start"], e["at_end"], e["curve"]
        pick = [c[max(0, len(c) // 10 - 1)][1], c[len(c) // 2][1], c[-1][1]] if c else []
        lines.append(f"| {name} | {s['query_output_norm']:.2f} / {t['query_output_norm']:.2f} | {s['soft_prompt_norm']:.2f} / "
                     f"{t['soft_prompt_norm']:.2f} | {s['llm_token_embedding_norm']:.2f} | {s['image_dependence']:.2f} / "
                     f"{t['image_dependence']:.2f} | {' / '.join(f'{v:.3f}' for v in pick)} | {e['held_out_caption_loss']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
