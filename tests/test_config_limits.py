"""Untrusted config files: a YAML config is capped in size and its aliases may not expand it without
bound (a "billion laughs" of a few hundred bytes kept `vlbridge validate` busy until memory ran out);
nesting too deep for Python is a named error, not a RecursionError. Annotation files (COCO JSON of
hundreds of MB) are read whatever their size."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vlbridge.errors import InputFileError, VLBridgeError
from vlbridge.files.userfiles import CONFIG_LIMIT, read_json, read_yaml

# nine levels of nine aliases each: 342 bytes standing for 9**9 (387,420,489) strings
BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{name}: &{name} [{', '.join(['*' + previous] * 9)}]\n" for previous, name in zip("abcdefgh", "bcdefghi"))


def test_an_alias_bomb_is_refused_before_anything_expands_it(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB + "description: *i\n", encoding="utf-8")
    with pytest.raises(InputFileError, match=r"aliases \(\*name\) expand it to more than 1,000,000 values"):
        read_yaml(path, "assembly file")


def test_validate_refuses_an_alias_bomb_in_an_assembly_at_once(tmp_path):
    """In a subprocess with a timeout: before the guard, pydantic walked the 387M strings for minutes."""
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB + "name: bomb\ndescription: *i\nencoder: {use: eva-vit-g}\nconnector: {use: qformer}\nllm: {use: opt}\n",
                    encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "vlbridge", "validate", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "billion laughs" in done.stderr and "Traceback" not in done.stderr


def test_aliases_that_stay_small_still_load(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("base: &b {lr: 1.0e-3, betas: [0.9, 0.98]}\nstage1: {optimizer: *b}\nstage2: {optimizer: {<<: *b, lr: 1.0e-4}}\n",
                    encoding="utf-8")
    assert read_yaml(path, "t") == {"base": {"lr": 1e-3, "betas": [0.9, 0.98]}, "stage1": {"optimizer": {"lr": 1e-3, "betas": [0.9, 0.98]}},
                                    "stage2": {"optimizer": {"lr": 1e-4, "betas": [0.9, 0.98]}}}


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path):
    """PyYAML builds it as a list that holds itself; anything printing or validating it never ends."""
    path = tmp_path / "loop.yaml"
    path.write_text("name: x\ndata: &d {paths: [a.json, *d]}\n", encoding="utf-8")
    with pytest.raises(InputFileError, match="an alias refers to the anchored value it is inside of .* at line 2"):
        read_yaml(path, "training config")


def test_a_yaml_config_over_the_cap_is_refused_by_its_size(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("name: x\n" + "# padding\n" * (CONFIG_LIMIT * 3 // 20), encoding="utf-8")
    with pytest.raises(InputFileError) as info:
        read_yaml(path, "training config")
    assert str(info.value) == (f"training config {str(path)!r} is 1.5 MiB; a YAML config is at most 1 MiB (its settings take a "
                               "few KB): give the config file itself")


@pytest.mark.parametrize("name, text, reader", [
    ("deep.yaml", "x: " + "[" * 5000 + "]" * 5000 + "\n", read_yaml),
    ("deep.json", "[" * 100_000 + "]" * 100_000, read_json),
], ids=["yaml", "json"])
def test_nesting_too_deep_for_python_is_a_named_error(tmp_path, name, text, reader):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputFileError, match="nested more deeply than Python's (YAML|JSON) reader goes"):
        reader(path, "config")


def test_an_annotation_file_larger_than_a_config_is_read(tmp_path):
    from vlbridge.data.coco import read_coco_captions

    path = tmp_path / "captions.json"
    records = [{"image": f"img_{i}.png", "caption": f"a photo of {'many ' * 20}things number {i}"} for i in range(12_000)]
    path.write_text(json.dumps(records), encoding="utf-8")
    assert path.stat().st_size > 1.5 * CONFIG_LIMIT
    assert len(read_coco_captions(path)) == 12_000


def test_a_checkpoints_saved_config_is_alias_checked_too(tmp_path):
    """A resume reads the step's train.yaml and compares it with the run's config, walking all of it."""
    from vlbridge.train.checkpointing import CONFIG_FILE, load_saved_config

    (tmp_path / CONFIG_FILE).write_text(BOMB + "stage: *i\n", encoding="utf-8")
    with pytest.raises(VLBridgeError, match="is not the training config a checkpoint saves .*billion laughs"):
        load_saved_config(tmp_path)


def test_a_yaml_config_just_over_the_cap_gives_its_size_in_bytes(tmp_path):
    """1 MiB and 7 bytes read '1.0 MiB; ... at most 1 MiB', as if it were within the cap."""
    path = tmp_path / "just-over.yaml"
    path.write_text("name: x\n" + "#" * (CONFIG_LIMIT - 1), encoding="utf-8")
    with pytest.raises(InputFileError, match=rf"is {CONFIG_LIMIT + 7:,} bytes; a YAML config is at most 1 MiB"):
        read_yaml(path, "training config")
