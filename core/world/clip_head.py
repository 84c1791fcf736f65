"""A CLIP head for the shipped world encoder, trained LiT-style, so the encoder can retrieve alone.

    python -m vlbridge.world.clip_head --out plugins/world           # the shipped head (~8 CPU minutes, one thread)
    python -m vlbridge.world.clip_head --out /tmp/parts --quick      # seconds, for tests

Why: BLIP-2 claims its Q-Former retrieves better than the CLIP-style model under it, and the demo
shows that as a reference row ("CLIP-style encoder alone"). The world encoder was trained CLIP-style
(`train_encoder`), but only its vision tower was shipped; the head on [CLS] and the text tower were
thrown away. Retraining the encoder would change the vision tower and everything trained on it, so
the decision is LiT ("locked-image tuning", Zhai et al. 2022): the shipped vision tower stays frozen,
and a fresh head (`head_norm` + `head` on [CLS]), a fresh word-level `TextEncoder` of the recipe's
sizes and a logit scale learn to match it, with the encoder's own loss (`clip_loss`: every caption of
an image a positive, each scene's twin a hard negative, as `batch_of` draws them), on the same
pretrain stream (never a split image, never a held-out pair), captions of the six describing kinds
(`BASE_CAPTION_KINDS`), with the encoder's augmentation. Only the vision tower's forward runs, without
gradients, so a step costs a fraction of an encoder step. The shipped head (1,500 steps of 64 images,
as the encoder's) retrieves at R@1 0.79 / 0.82 among 300 val images (`train_encoder.retrieval`),
where the encoder's own, jointly trained and discarded head got 0.77 / 0.80.

Writes OUT/eva-vit-g-clip/: model.safetensors (the head, text tower and logit scale, fp16), vocab.json
(the word list, so the head never depends on the language code changing later) and config.json
(sizes, and the SHA-256 of the eva-vit-g weights it was trained on: `load_clip_head` refuses another
encoder); and its entry in OUT/manifest.json (recipe, losses, val retrieval, seconds). The eva-vit-g
folder is left as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from vlbridge.errors import VLBridgeError, WeightsError
from vlbridge.files.atomic import atomic_write, atomic_write_text
from vlbridge.plugins.encoders.eva_vit_g_model import EvaViTG
from vlbridge.world.assets import ENCODER_FILE, MANIFEST, part_dir, world_dir
from vlbridge.world.config import WorldConfig
from vlbridge.world.language import BASE_CAPTION_KINDS
from vlbridge.world.train_encoder import (EMBED_DIM, ClipTrainer, EncoderRecipe, TextEncoder, WordVocab, augment, batch_of,
                                          build_vocab, clip_loss, decay_groups, lr_at, normalise, retrieval)

PART = "eva-vit-g-clip"  # the folder beside eva-vit-g, and its manifest entry
SCRIPT = "vlbridge.world.clip_head"
SCRIPT_VERSION = 1
MODEL_TYPE = "world-clip-head"
HEAD_FILE, VOCAB_FILE, CONFIG_FILE = "model.safetensors", "vocab.json", "config.json"
TEXT_LENGTH = 48  # words + [CLS]: a four-object scene caption runs to 35 words (the encoder's tower cut at 32)
RECIPE = EncoderRecipe(steps=1500, batch=64, lr=1e-3, warmup=150, attributes=0.0)  # the encoder's steps and batches; no cell heads
QUICK = EncoderRecipe(steps=3, batch=8, warmup=1, attributes=0.0)
EVAL_IMAGES = {"full": 300, "quick": 8}
LOG_EVERY = 50
Log = Callable[[str], None]


def head_world(seed: int) -> WorldConfig:
    """The world the head learns from: the seed's, with the six describing caption kinds only (the
    encoder's), whatever kinds the language adds later."""
    return WorldConfig(seed=seed, captions_per_image=len(BASE_CAPTION_KINDS))


class LockedClip(nn.Module):
    """The frozen shipped vision tower with a trainable CLIP head on [CLS] and a text tower: what
    `train_encoder.retrieval` and `attribute_probe` read, as they read a `ClipTrainer`."""

    def __init__(self, vision: EvaViTG, vocab: int, text_width: int, text_layers: int, length: int = TEXT_LENGTH) -> None:
        super().__init__()
        self.vision = vision.freeze()  # locked: no gradient, eval mode, never saved with the head
        width = vision.width
        self.head_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, EMBED_DIM, bias=False)
        self.text = TextEncoder(vocab, text_width, text_layers, EMBED_DIM, length)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    embed = ClipTrainer.embed  # the same read-out of [CLS] as the encoder's training
    image_features = ClipTrainer.image_features

    def head_state(self) -> dict[str, torch.Tensor]:
        """Everything but the vision tower (which stays in its own folder)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("vision.")}


def text_features(tower: TextEncoder, vocab: WordVocab, texts: list[str], chunk: int = 64) -> torch.Tensor:
    """`tower` on each distinct text once, in chunks of alike length (little padding: captions run from
    5 to 35 words), returned in the order of `texts`. Half the cost of one padded batch, same values."""
    distinct = sorted(set(texts), key=lambda t: (len(t.split()), t))
    parts = [tower(*vocab.encode(distinct[at: at + chunk])) for at in range(0, len(distinct), chunk)]
    where = {t: i for i, t in enumerate(distinct)}
    return torch.cat(parts)[torch.tensor([where[t] for t in texts])]


def load_vision(root: str | Path | None = None) -> EvaViTG:
    """The eva-vit-g encoder of `root` (default: the shipped one), as the world presets load it."""
    from vlbridge.plugins.encoders.eva_vit_g import EvaVitGOptions
    from vlbridge.plugins.encoders.eva_vit_g_model import build

    return build(EvaVitGOptions(pretrained=str(part_dir("eva-vit-g", root))))


def vision_digest(root: str | Path | None = None) -> str:
    """SHA-256 of the eva-vit-g weights file: which vision tower a head belongs to."""
    return hashlib.sha256((part_dir("eva-vit-g", root) / ENCODER_FILE).read_bytes()).hexdigest()


def train_clip_head(vision: EvaViTG, world: WorldConfig, recipe: EncoderRecipe, seed: int,
                    log: Log = print) -> tuple[LockedClip, WordVocab, list[float]]:
    """Train the head and text tower on the frozen `vision`; return them (eval mode), the vocabulary
    and the contrastive loss of every step."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    vocab = build_vocab(world, TEXT_LENGTH)
    model = LockedClip(vision, len(vocab), recipe.text_width, recipe.text_layers)
    optimizer = torch.optim.AdamW(decay_groups(model, recipe.weight_decay), lr=recipe.lr)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(recipe.steps):
        pixels, captions, _ = batch_of(world, step, recipe, rng)
        with torch.no_grad():
            tokens = model.vision(normalise(augment(pixels, recipe.shift, recipe.noise, generator)))
        texts = text_features(model.text, vocab, [t for group in captions for t in group])
        loss = clip_loss(model.embed(tokens), texts, captions, model.logit_scale)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % LOG_EVERY == 0 or step == recipe.steps - 1:
            log(f"clip head step {step}/{recipe.steps} contrast {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    return model, vocab, losses


def save_clip_head(model: LockedClip, vocab: WordVocab, recipe: EncoderRecipe, digest: str, out: Path) -> Path:
    """OUT/eva-vit-g-clip/: the head in fp16, the word list and the config; each file written atomically."""
    from safetensors.torch import save_file

    folder = out / PART
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in model.head_state().items()}
    atomic_write(folder / HEAD_FILE, lambda tmp: save_file(state, str(tmp)))
    atomic_write_text(folder / VOCAB_FILE, json.dumps({"words": vocab.words}, indent=1) + "\n")
    config = {"model_type": MODEL_TYPE, "vision": "eva-vit-g", "vision_sha256": digest, "width": model.vision.width,
              "embed_dim": EMBED_DIM, "text_width": recipe.text_width, "text_layers": recipe.text_layers, "text_length": TEXT_LENGTH}
    atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=1) + "\n")
    return folder


def load_clip_head(root: str | Path | None = None) -> tuple[LockedClip, WordVocab]:
    """The head of `root` (default: the shipped world folder) on the eva-vit-g beside it, in eval
    mode; refused (WeightsError) when that encoder is not the one the head was trained on."""
    from safetensors.torch import load_file

    base = Path(root) if root is not None else world_dir()
    folder = base / PART
    again = f"train it again with python -m {SCRIPT} --out {base}"
    missing = [name for name in (HEAD_FILE, VOCAB_FILE, CONFIG_FILE) if not (folder / name).is_file()]
    if missing:
        raise WeightsError(f"the world encoder's CLIP head lacks {missing} at {folder}; {again}")
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    if config.get("model_type") != MODEL_TYPE:
        raise WeightsError(f"{folder / CONFIG_FILE} has model_type {config.get('model_type')!r}, not {MODEL_TYPE!r}; {again}")
    if config.get("vision_sha256") != vision_digest(base):
        raise WeightsError(f"the CLIP head at {folder} was trained on another eva-vit-g than the one at {part_dir('eva-vit-g', base)} "
                           f"(its weights changed since); {again}")
    words = json.loads((folder / VOCAB_FILE).read_text(encoding="utf-8"))["words"]
    vocab = WordVocab(words, config["text_length"])
    if vocab.words != words:
        raise WeightsError(f"{folder / VOCAB_FILE}: the word list must be sorted and without repeats (as {SCRIPT} writes it); {again}")
    model = LockedClip(load_vision(base), len(vocab), config["text_width"], config["text_layers"], config["text_length"])
    state = {k: v.float() for k, v in load_file(str(folder / HEAD_FILE)).items()}
    wanted = model.head_state()
    if state.keys() != wanted.keys() or any(state[k].shape != wanted[k].shape for k in wanted):
        raise WeightsError(f"{folder / HEAD_FILE} does not hold the head its config.json describes; {again}")
    model.load_state_dict({**model.state_dict(), **state})
    return model.eval(), vocab


def _loss_summary(losses: list[float]) -> dict[str, Any]:
    """First and final loss (means of the first and last LOG_EVERY steps) and the mean of each window."""
    windows = {str(at): round(sum(losses[at: at + LOG_EVERY]) / len(losses[at: at + LOG_EVERY]), 4) for at in range(0, len(losses), LOG_EVERY)}
    tail = losses[-LOG_EVERY:]
    return {"first": round(losses[0], 4), "final": round(sum(tail) / len(tail), 4), "by_step": windows}


def record(out: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Put `entry` under parts[PART] of OUT/manifest.json (read just before, replaced atomically; every
    other key kept as it is); a missing manifest starts as {}."""
    path = out / MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    manifest.setdefault("parts", {})[PART] = entry
    atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")
    return manifest


def train_and_ship(out: str | Path, seed: int = 0, quick: bool = False, log: Log = print) -> dict[str, Any]:
    """Train the head on OUT/eva-vit-g, write OUT/eva-vit-g-clip and its manifest entry; return the entry."""
    out = Path(out)
    recipe, images = (QUICK, EVAL_IMAGES["quick"]) if quick else (RECIPE, EVAL_IMAGES["full"])
    world = head_world(seed)
    digest = vision_digest(out)
    began, began_cpu = time.perf_counter(), time.process_time()
    model, vocab, losses = train_clip_head(load_vision(out), world, recipe, seed, log)
    seconds, cpu = time.perf_counter() - began, time.process_time() - began_cpu
    folder = save_clip_head(model, vocab, recipe, digest, out)
    shipped, _ = load_clip_head(out)  # measured as shipped (fp16)
    checks = {split: retrieval(shipped, vocab, world, split, images) for split in ("val", "comp")}
    entry = {
        "script": SCRIPT, "script_version": SCRIPT_VERSION, "quick": quick, "seed": seed,
        "method": "LiT (locked-image tuning, Zhai et al. 2022): the shipped eva-vit-g vision tower frozen; a fresh head "
                  "(LayerNorm + projection of [CLS]), word-level text tower and logit scale trained with the encoder's "
                  "contrastive loss (every caption of an image a positive, twins as hard negatives)",
        "vision": "eva-vit-g", "vision_sha256": digest, "params": sum(p.numel() for p in model.head_state().values()),
        "recipe": {**dataclasses.asdict(recipe), "text_length": TEXT_LENGTH},
        "data": "the world's 'pretrain' stream (no split image, no held-out pair), indices as the encoder's batches",
        "caption_kinds": list(BASE_CAPTION_KINDS), "vocabulary_words": len(vocab.words), "steps": recipe.steps,
        "losses": _loss_summary(losses), "retrieval_zero_shot": checks,
        "train_seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
        "bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
    }
    record(out, entry)
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {SCRIPT}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the world parts folder: reads OUT/eva-vit-g, writes OUT/eva-vit-g-clip "
                        "and its entry in OUT/manifest.json (the repository's plugins/world ships them)")
    parser.add_argument("--seed", type=int, default=0, help="the world's seed and the training seed")
    parser.add_argument("--quick", action="store_true", help="a few steps: checks the script end to end in seconds")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as train_parts: one thread is the fastest on a shared 2-core machine
    try:
        entry = train_and_ship(args.out, args.seed, args.quick)
    except VLBridgeError as exc:
        print(f"clip_head: error: {exc}", file=sys.stderr)
        return 2
    val = entry["retrieval_zero_shot"]["val"]
    print(f"wrote {Path(args.out) / PART} in {entry['train_seconds']} s ({entry['cpu_seconds']} CPU seconds); val R@1 "
          f"image->text {val['image_to_text_r1']}, text->image {val['text_to_image_r1']} among {val['candidates']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
