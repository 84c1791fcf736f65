"""`world generate` into a world written before: splits it does not regenerate (size 0) are kept,
never silently deleted; where they would no longer match the new settings it refuses and says why."""

from __future__ import annotations

import json

import pytest

from vlbridge.cli.main import main
from vlbridge.data.coco import read_coco_captions
from vlbridge.errors import VLBridgeError
from vlbridge.world import SPLITS, WorldConfig, generate_world

FIRST = WorldConfig(train=3, val=2, test=2, comp=2, image_size=32)


def _files(out, split):
    return {p.name: p.read_bytes() for p in sorted(out.rglob(f"*{split}*")) if p.is_file()}


def test_splits_left_at_zero_are_kept(tmp_path):
    out = tmp_path / "w"
    generate_world(out, FIRST)
    before = {split: _files(out, split) for split in ("val", "test", "comp")}
    manifest = generate_world(out, FIRST.model_copy(update={"train": 4, "val": 0, "test": 0, "comp": 0}))
    assert {split: _files(out, split) for split in ("val", "test", "comp")} == before
    assert len(list((out / "images").glob("world_train_*.png"))) == 4
    assert manifest["kept"] == ["val", "test", "comp"]
    assert {s: manifest["stats"][s]["images"] for s in SPLITS} == {"train": 4, "val": 2, "test": 2, "comp": 2}
    assert {s: manifest["config"][s] for s in SPLITS} == {"train": 4, "val": 2, "test": 2, "comp": 2}
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8")) == manifest
    assert {r.image_id for r in read_coco_captions(out / "captions_val.json")} == {1_000_001, 1_000_002}


def test_a_world_of_other_settings_is_not_mixed_in(tmp_path):
    out = tmp_path / "w"
    generate_world(out, FIRST)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(VLBridgeError, match=r"val, test, comp.*seed 0.*seed 5.*every split a size"):
        generate_world(out, FIRST.model_copy(update={"seed": 5, "val": 0, "test": 0, "comp": 0}))
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_every_split_sized_replaces_the_world(tmp_path):
    out = tmp_path / "w"
    generate_world(out, FIRST)
    manifest = generate_world(out, FIRST.model_copy(update={"seed": 5, "val": 1}))
    assert manifest["kept"] == [] and len(list((out / "images").glob("world_val_*.png"))) == 1


def test_cli_says_what_it_kept(tmp_path, capsys):
    out = str(tmp_path / "w")
    assert main(["world", "generate", "--out", out, "--train", "2", "--val", "1", "--test", "1", "--comp", "1"]) == 0
    capsys.readouterr()
    assert main(["world", "generate", "--out", out, "--train", "3", "--val", "0", "--test", "0", "--comp", "0"]) == 0
    assert "kept the val, test and comp splits" in capsys.readouterr().out
    assert main(["world", "generate", "--out", out, "--seed", "2", "--val", "0"]) == 2
    err = capsys.readouterr().err
    assert "val" in err and "Traceback" not in err


def _cut_short(monkeypatch, after: int) -> None:
    """Make generate_world stop (as on Ctrl-C) when it is about to draw its image number `after`."""
    import vlbridge.world.generate as generate

    render, drawn = generate.render_scene, []

    def draw(scene, size):
        if len(drawn) == after:
            raise KeyboardInterrupt
        drawn.append(scene.image_id)
        return render(scene, size)

    monkeypatch.setattr(generate, "render_scene", draw)


def test_a_generation_cut_short_is_taken_up_by_the_next(tmp_path, monkeypatch):
    """A `world generate` (or a demo) interrupted while writing left images but no manifest: the
    rerun refused the folder ("not empty and holds no world"), so the demo could not resume."""
    out = tmp_path / "w"
    _cut_short(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        generate_world(out, FIRST)
    monkeypatch.undo()
    generate_world(out, FIRST)
    generate_world(tmp_path / "fresh", FIRST)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == \
        {p.name: p.read_bytes() for p in (tmp_path / "fresh").rglob("*") if p.is_file()}


def test_a_world_cut_short_over_another_is_not_reused_as_that_one(tmp_path, monkeypatch):
    """The previous world's manifest stayed while its files were being replaced: the demo then took
    the half-replaced folder for that world and trained on a mix of two worlds."""
    import vlbridge.compare.demo as demo

    out = tmp_path / "w"
    generate_world(out, FIRST)
    _cut_short(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        generate_world(out, FIRST.model_copy(update={"seed": 5}))
    monkeypatch.undo()
    said: list[str] = []
    sizes = {**{split: FIRST.size(split) for split in SPLITS}, "image_size": FIRST.image_size}
    demo.ensure_world(out, sizes, FIRST.seed, said.append)
    assert said == [f"generating the world in {out}"]
    generate_world(tmp_path / "fresh", FIRST)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == \
        {p.name: p.read_bytes() for p in (tmp_path / "fresh").rglob("*") if p.is_file()}


def test_a_cut_short_world_keeps_what_it_kept(tmp_path, monkeypatch):
    """Cut short while keeping a split, the rerun keeps it again; the splits it had begun are not kept."""
    out = tmp_path / "w"
    generate_world(out, FIRST)
    comp = _files(out, "comp")
    _cut_short(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):
        generate_world(out, FIRST.model_copy(update={"train": 4, "comp": 0}))
    monkeypatch.undo()
    manifest = generate_world(out, FIRST.model_copy(update={"train": 4, "test": 0, "comp": 0}))
    assert manifest["kept"] == ["comp"] and _files(out, "comp") == comp
    assert manifest["stats"]["test"]["images"] == 0
