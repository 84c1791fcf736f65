"""The world encoder's CLIP head (`vlbridge.world.clip_head`: LiT-style, on the frozen shipped vision
tower): the command trains, saves and loads one; the shipped one retrieves far above chance; a head
refuses an encoder it was not trained on; `train_parts` keeps its manifest entry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlbridge.errors import WeightsError
from vlbridge.world.assets import ENCODER_FILE, MANIFEST, part_dir, read_parts_manifest
from vlbridge.world.clip_head import PART, QUICK, head_world, load_clip_head, load_vision, main, vision_digest
from vlbridge.world.train_encoder import EMBED_DIM, retrieval

# The shipped head's R@1 on the first 100 val images (the `retrieval` rule: the scene caption, an
# identical string counts right; chance 0.01), measured when it was trained: 0.92 / 0.95. The floor is half of it.
SHIPPED_FLOOR = {"image_to_text_r1": 0.46, "text_to_image_r1": 0.47}


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A parts folder with the shipped encoder and an earlier manifest, then `--quick`."""
    out = tmp_path_factory.mktemp("parts")
    shutil.copytree(part_dir("eva-vit-g"), out / "eva-vit-g")
    (out / MANIFEST).write_text(json.dumps({"script": "an earlier run", "parts": {"opt": {"steps": 7}}}), encoding="utf-8")
    assert main(["--out", str(out), "--quick"]) == 0
    return out


def test_quick_trains_saves_and_loads(quick: Path):
    manifest = read_parts_manifest(quick)
    assert manifest["script"] == "an earlier run" and manifest["parts"]["opt"] == {"steps": 7}  # the rest left as it was
    entry = manifest["parts"][PART]
    assert entry["quick"] and entry["steps"] == QUICK.steps and entry["recipe"]["steps"] == QUICK.steps
    assert entry["vision_sha256"] == vision_digest() and entry["caption_kinds"][0] == "scene"
    assert entry["retrieval_zero_shot"]["val"]["candidates"] == 8 and entry["losses"]["final"] > 0
    assert entry["bytes"] == sum(f.stat().st_size for f in (quick / PART).iterdir())
    model, vocab = load_clip_head(quick)
    saved = load_file(str(quick / PART / "model.safetensors"))
    state = model.head_state()
    assert saved.keys() == state.keys() and {v.dtype for v in saved.values()} == {torch.float16}
    assert all(torch.equal(state[k], saved[k].float()) for k in saved)
    assert not any(p.requires_grad for p in model.vision.parameters())  # locked
    assert torch.equal(model.vision.pos_embed, load_vision().pos_embed)  # the shipped tower, untouched
    words = json.loads((quick / PART / "vocab.json").read_text(encoding="utf-8"))["words"]
    assert words == vocab.words and {"red", "triangle", "above"} <= set(words)
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        images, texts = model.image_features(pixels), model.text(*vocab.encode(["a red circle", "two shapes"]))
    assert images.shape == texts.shape == (2, EMBED_DIM)
    assert torch.allclose(images.norm(dim=-1), torch.ones(2)) and torch.allclose(texts.norm(dim=-1), torch.ones(2))


def test_a_head_refuses_an_encoder_it_was_not_trained_on(quick: Path, tmp_path: Path):
    shutil.copytree(quick / "eva-vit-g", tmp_path / "eva-vit-g")
    with pytest.raises(WeightsError, match=r"lacks .*model\.safetensors.*clip_head --out"):
        load_clip_head(tmp_path)
    shutil.copytree(quick / PART, tmp_path / PART)
    weights = tmp_path / "eva-vit-g" / ENCODER_FILE
    state = load_file(str(weights))
    state["pos_embed"] = state["pos_embed"] + 0.01  # a retrained encoder
    save_file(state, str(weights))
    with pytest.raises(WeightsError, match="trained on another eva-vit-g.*clip_head --out"):
        load_clip_head(tmp_path)


def test_train_parts_keeps_the_head_entry(quick: Path):
    """train_parts rewrites the manifest but keeps the entries of parts it did not train."""
    from vlbridge.world.train_parts import main as train_parts

    before = read_parts_manifest(quick)["parts"][PART]
    assert train_parts(["--out", str(quick), "--quick", "--parts", "bert"]) == 0
    manifest = read_parts_manifest(quick)
    assert manifest["parts"][PART] == before and PART in manifest["parts_from_earlier_runs"]
    load_clip_head(quick)  # still the encoder it was trained on


def test_the_shipped_head_retrieves_far_above_chance():
    entry = read_parts_manifest()["parts"][PART]
    assert not entry["quick"] and entry["vision_sha256"] == vision_digest()
    assert entry["bytes"] < 1_000_000 and entry["cpu_seconds"] < 600
    model, vocab = load_clip_head()
    found = retrieval(model, vocab, head_world(0), "val", 100)
    for key, floor in SHIPPED_FLOOR.items():
        assert found[key] >= floor > 10 / found["candidates"], (key, found)
