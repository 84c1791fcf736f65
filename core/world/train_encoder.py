"""The world's image encoder, trained as EVA-CLIP was: CLIP-style InfoNCE against a text encoder
that exists only for this training, on captions of the world's "pretrain" stream (never the
splits, never a held-out pair), with shift and noise augmentation.

Two things make the few hundred steps count: every caption of an image is a positive (the text
side is cheap, the image side is not), and half of each batch are "twins" of the other half with
one object changed (colour alone tells most random scenes apart, so shape, size and place would
otherwise be learnt late). FLIP-style patch dropping was tried and left out: objects here span a
few patches, and dropping half of them often drops an object its caption names.

Contrast alone left shape weak (300 steps at 64 px: `encoder_probe`'s converged linear probe reads
56% of shapes), likely because colour and place already tell most captions apart. So the recipe
adds a supervised side task (`attributes`), as a detector backbone would learn: from the mean of
the patch tokens of each grid cell, linear heads name the cell's colour, shape and size, or
"empty". The heads see only the pretrain stream and are thrown away with the CLIP head;
`encoder_probe` then fits fresh linear heads of the same form on the train split and scores them
on the test split. The shipped encoder: 1,500 steps with the side task at 64 px. It tells a
caption from its one-attribute edit far better (shape 0.77, size 0.92 against 0.63 and 0.73) and
retrieves 1.8x better zero-shot, but the linear shape probe stays at 56%; at 96 px (patch 12,
still 65 tokens) it read 62% (docs/demo-findings.md section 1).

The result is an `eva-vit-g` encoder directory (config.json + model.safetensors, given to eva-vit-g's
`pretrained`): the frozen image encoder of the world.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlbridge.plugins.encoders.eva_vit_g import EvaVitGOptions
from vlbridge.plugins.encoders.eva_vit_g_model import EvaViTG
from vlbridge.plugin.specs import CLIP_MEAN, CLIP_STD
from vlbridge.world.config import WorldConfig
from vlbridge.world.encoder_probe import cell_labels, cell_pool
from vlbridge.world.generate import make_image
from vlbridge.world.language import BASE_CAPTION_KINDS, caption
from vlbridge.world.render import BACKGROUND, render_scene
from vlbridge.world.scene import COLOURS, GRID, SHAPES, SIZES, Allowed, Scene

EMBED_DIM = 128  # the joint image-text space of the contrastive training (discarded afterwards)


@dataclass(frozen=True)
class EncoderRecipe:
    """How long and how hard: steps of `batch` fresh images each, AdamW with warmup and cosine decay."""

    steps: int = 1500  # the shipped encoder's recipe (see the manifest)
    batch: int = 64  # half fresh scenes, half their twins
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 150
    shift: int = 3  # pixels of random translation
    noise: float = 0.03  # std of Gaussian pixel noise (in 0..1 units)
    text_width: int = 128
    text_layers: int = 2
    attributes: float = 1.0  # weight of the per-cell attribute loss (0: contrast alone)


class WordVocab:
    """Word-level ids for the training-only text encoder: the world's grammar has ~60 words."""

    PAD, UNKNOWN, CLS = 0, 1, 2

    def __init__(self, texts: list[str], length: int = 32) -> None:
        words = sorted({w for t in texts for w in t.replace(",", " ,").split()})
        self.ids = {w: i + 3 for i, w in enumerate(words)}
        self.length = length  # the text tower's positions: longer texts are cut

    def __len__(self) -> int:
        return len(self.ids) + 3

    @property
    def words(self) -> list[str]:
        """The words in id order: `WordVocab(words)` rebuilds the same ids (what a saved vocabulary keeps)."""
        return sorted(self.ids, key=self.ids.__getitem__)

    def encode(self, texts: list[str], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) ids, [CLS] first, padded to the longest text (at most `length`, default the
        vocabulary's), and the mask of real tokens."""
        length = length or self.length
        rows = [[self.CLS, *(self.ids.get(w, self.UNKNOWN) for w in text.replace(",", " ,").split())][:length] for text in texts]
        ids = torch.zeros(len(texts), max(map(len, rows)), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return ids, ids != self.PAD


class TextEncoder(nn.Module):
    """A small pre-LN transformer over words, read at [CLS] (a mean would lose the word order that
    tells "a red circle above a blue square" from "a blue square above a red circle")."""

    def __init__(self, vocab: int, width: int, layers: int, out_dim: int, length: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.position = nn.Parameter(torch.randn(1, length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim, bias=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position[:, : ids.shape[1]]
        x = self.norm(self.blocks(x, src_key_padding_mask=~mask))
        return F.normalize(self.proj(x[:, 0]), dim=-1)


def sincos_positions(width: int, grid: int) -> torch.Tensor:
    """(1, 1 + grid*grid, width) fixed 2-D sine-cosine embeddings (MAE's), zero for [CLS]."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    y, x = rows.flatten()[:, None] * omega, cols.flatten()[:, None] * omega  # (g*g, W/4)
    patches = torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)
    return torch.cat([torch.zeros(1, width), patches], dim=0)[None]


class ClipTrainer(nn.Module):
    """The encoder being trained, its head (LN + projection of [CLS]) and the text tower."""

    def __init__(self, opts: EvaVitGOptions, vocab: int, recipe: EncoderRecipe) -> None:
        super().__init__()
        self.vision = EvaViTG(opts).unfreeze()
        self.vision.train()
        with torch.no_grad():  # a head start on where things are: 2-D sin-cos positions, still learnt
            self.vision.pos_embed.copy_(sincos_positions(opts.arch["width"], opts.resolved_image_size // opts.arch["patch"]))
        width = opts.arch["width"]
        self.head_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, EMBED_DIM, bias=False)
        self.text = TextEncoder(vocab, recipe.text_width, recipe.text_layers, EMBED_DIM)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.cells = nn.ModuleList(nn.Linear(width, n + 1) for n in (len(COLOURS), len(SHAPES), len(SIZES)))  # + "empty"

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of [CLS] after the last block (through the training-only head)."""
        return self.embed(self.vision(pixels))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """`image_features` from tokens already computed (the training step shares them with the cell heads)."""
        return F.normalize(self.head(self.head_norm(tokens[:, 0])), dim=-1)

    def attribute_loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the linear cell heads; `labels` (B, 9, 3) as `cell_labels` (-1: empty)."""
        cells = cell_pool(tokens)  # (B, 9, W)
        losses = [F.cross_entropy(head(cells).flatten(0, 1), labels[..., i].flatten() + 1) for i, head in enumerate(self.cells)]
        return sum(losses) / len(losses)


def to_pixels(images: list, image_size: int) -> torch.Tensor:
    """PIL images -> (B, 3, S, S) floats in 0..1."""
    array = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div_(255.0)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """0..1 pixels -> the encoder's input (CLIP mean and std, as `eva-vit-g`'s preprocess)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def augment(pixels: torch.Tensor, shift: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """Random translation (background fill) and pixel noise; no flips: they would swap left and right."""
    if shift:
        size = pixels.shape[-1]
        padded = torch.ones(pixels.shape[0], 3, size + 2 * shift, size + 2 * shift) * (torch.tensor(BACKGROUND) / 255.0).view(1, 3, 1, 1)
        padded[:, :, shift: shift + size, shift: shift + size] = pixels
        offsets = torch.randint(0, 2 * shift + 1, (pixels.shape[0], 2), generator=generator).tolist()
        pixels = torch.stack([padded[i, :, dy: dy + size, dx: dx + size] for i, (dy, dx) in enumerate(offsets)])
    if noise:
        pixels = pixels + noise * torch.randn(pixels.shape, generator=generator)
    return pixels.clamp(0, 1)


def clip_loss(image: torch.Tensor, text: torch.Tensor, captions: list[list[str]], logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with several positives: every caption of an image (`captions[i]`, the texts
    in order) and any caption that is the same string as one of them. Several captions per image
    give the text side more to learn from per image, which is the costly side here."""
    texts = [t for group in captions for t in group]
    logits = logit_scale.exp().clamp(max=100) * image @ text.T  # (B, T)
    positive = torch.tensor([[t in group for t in texts] for group in map(set, captions)], dtype=torch.float32)
    image_loss = F.cross_entropy(logits, positive / positive.sum(1, keepdim=True))
    text_loss = F.cross_entropy(logits.T, positive.T / positive.T.sum(1, keepdim=True))
    return (image_loss + text_loss) / 2


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's parameter groups over the trainable parameters: weight decay on matrices, none on
    biases, norms, the logit scale and position tables (decay would pull positions together)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decayed = [p.dim() >= 2 and "pos" not in n for n, p in named]  # "pos" also matches "position"
    return [{"params": [p for (_, p), d in zip(named, decayed) if d], "weight_decay": weight_decay},
            {"params": [p for (_, p), d in zip(named, decayed) if not d], "weight_decay": 0.0}]


VOCAB_IMAGES = 1000  # pretrain images whose captions make a text tower's vocabulary


def build_vocab(world: WorldConfig, length: int = 32) -> WordVocab:
    """The word vocabulary of a text tower: the captions of VOCAB_IMAGES pretrain-stream images."""
    return WordVocab([c for i in range(VOCAB_IMAGES) for c in make_image(world, "pretrain", 10_000_000 + i).captions], length)


def lr_at(step: int, recipe: EncoderRecipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * progress))


CHANGES = ("shape", "size", "place", "colour")


def twin(scene: Scene, rng: random.Random, allowed: Allowed, change: str | None = None) -> Scene:
    """The scene with one thing changed (an object's shape, size or colour, or where two objects
    are; `change`, else drawn): a hard negative, since colours alone tell most scenes apart."""
    objects = list(scene.objects)
    k = rng.randrange(len(objects))
    obj, change = objects[k], change or rng.choices(CHANGES, weights=(4, 2, 3, 1))[0]
    if change == "place" and len(objects) > 1:
        j = rng.choice([j for j in range(len(objects)) if objects[j].pair != obj.pair] or [k])
        other = objects[j]
        objects[k] = replace(obj, row=other.row, col=other.col)
        objects[j] = replace(other, row=obj.row, col=obj.col)
    elif change == "place":
        cell = rng.choice([c for c in range(GRID * GRID) if c != obj.row * GRID + obj.col])
        objects[k] = replace(obj, row=cell // GRID, col=cell % GRID)
    elif change == "size":
        objects[k] = replace(obj, size=SIZES[1 - SIZES.index(obj.size)])
    elif change == "shape":
        objects[k] = replace(obj, shape=rng.choice([s for s in SHAPES if s != obj.shape and allowed(obj.colour, s)]))
    else:
        objects[k] = replace(obj, colour=rng.choice([c for c in COLOURS if c != obj.colour and allowed(c, obj.shape)]))
    return Scene(scene.image_id, scene.split, tuple(sorted(objects, key=lambda o: (o.row, o.col))))


def batch_of(world: WorldConfig, step: int, recipe: EncoderRecipe, rng: random.Random) -> tuple[torch.Tensor, list[list[str]], list[Scene]]:
    """Half a batch of fresh pretrain-stream scenes and their twins, with every caption of each;
    a scene and its twin have captions of the same kinds, which differ where the pixels do."""
    half = recipe.batch // 2
    scenes = [make_image(world, "pretrain", step * half + k).scene for k in range(half)]
    allowed = world.allowed("pretrain")
    scenes += [twin(scene, rng, allowed) for scene in scenes]
    captions = [[caption(scene, kind, rng) for kind in BASE_CAPTION_KINDS] for scene in scenes]  # the kinds it shipped with
    return to_pixels([render_scene(scene, world.image_size) for scene in scenes], world.image_size), captions, scenes


def train_encoder(opts: EvaVitGOptions, world: WorldConfig, recipe: EncoderRecipe, seed: int, log=print) -> tuple[EvaViTG, ClipTrainer, WordVocab]:
    """Train and return the encoder (frozen), the whole trainer (for evaluation) and its vocabulary."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    vocab = build_vocab(world)
    model = ClipTrainer(opts, len(vocab), recipe)
    optimizer = torch.optim.AdamW(decay_groups(model, recipe.weight_decay), lr=recipe.lr)
    start = time.perf_counter()
    for step in range(recipe.steps):
        pixels, captions, scenes = batch_of(world, step, recipe, rng)
        tokens = model.vision(normalise(augment(pixels, recipe.shift, recipe.noise, generator)))
        ids, mask = vocab.encode([t for group in captions for t in group])
        contrast = clip_loss(model.embed(tokens), model.text(ids, mask), captions, model.logit_scale)
        attributes = model.attribute_loss(tokens, cell_labels(scenes)) if recipe.attributes else torch.zeros(())
        loss = contrast + recipe.attributes * attributes
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == recipe.steps - 1:
            log(f"encoder step {step}/{recipe.steps} contrast {contrast.item():.3f} attributes {attributes.item():.3f} "
                f"({time.perf_counter() - start:.0f} s)")
    model.eval()
    return model.vision.freeze(), model, vocab


@torch.no_grad()
def retrieval(model: ClipTrainer, vocab: WordVocab, world: WorldConfig, split: str, count: int) -> dict[str, float]:
    """Zero-shot R@1 between a split's images and their first ("scene") captions, both ways;
    a caption that is the same string as the right one counts as right. Chance is 1/count."""
    images = [make_image(world, split, i) for i in range(count)]
    texts = [im.captions[0] for im in images]
    image_parts, text_parts = [], []
    for at in range(0, count, 100):
        chunk = images[at: at + 100]
        image_parts.append(model.image_features(normalise(to_pixels([render_scene(im.scene, world.image_size) for im in chunk], world.image_size))))
        text_parts.append(model.text(*vocab.encode(texts[at: at + 100])))
    sims = torch.cat(image_parts) @ torch.cat(text_parts).T
    i2t = sum(texts[j] == texts[i] for i, j in enumerate(sims.argmax(1).tolist())) / count
    t2i = sum(texts[j] == texts[i] for i, j in enumerate(sims.argmax(0).tolist())) / count
    return {"image_to_text_r1": round(i2t, 4), "text_to_image_r1": round(t2i, 4), "candidates": count}


@torch.no_grad()
def attribute_probe(model: ClipTrainer, vocab: WordVocab, world: WorldConfig, split: str, count: int) -> dict[str, float]:
    """Per attribute, how often an image's caption beats the caption of its twin with that one
    attribute changed (chance 0.5): what the encoder learnt to see, and what not yet."""
    rng, allowed = random.Random(0), world.allowed(split)
    scenes = [make_image(world, split, i).scene for i in range(count)]
    features = model.image_features(normalise(to_pixels([render_scene(s, world.image_size) for s in scenes], world.image_size)))
    result = {}
    for change in CHANGES:
        kind = "location" if change == "place" else "inventory"
        pairs = [(i, caption(s, kind, rng), caption(twin(s, rng, allowed, change), kind, rng))
                 for i, s in enumerate(scenes) if change != "place" or len(s.objects) <= 2]
        pairs = [p for p in pairs if p[1] != p[2]]
        rows = torch.tensor([i for i, _, _ in pairs])
        right, wrong = (model.text(*vocab.encode([p[k] for p in pairs])) for k in (1, 2))
        wins = (features[rows] * right).sum(1) > (features[rows] * wrong).sum(1)
        result[change] = round(wins.float().mean().item(), 3)
    return result
