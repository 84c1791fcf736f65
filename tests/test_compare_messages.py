"""What a comparison tells its user while it runs: no "reusing its results" for runs just trained
by worker processes, no "no checkpoint yet" for every fresh run, and an overall progress line that
follows the workers' phases (a non-TTY log has nothing else) and ends with the real time spent."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import fake_plugins as fake
from vlbridge.compare.config import CompareConfig, EvalSet, RunSpec
from vlbridge.compare.run import run_compare

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(tmp_path: Path, jobs: int) -> CompareConfig:
    from vlbridge.world import WorldConfig, generate_world

    world = tmp_path / "world"
    if not world.exists():
        generate_world(world, WorldConfig(train=8, val=0, test=3, comp=0, questions_per_image=2, image_size=32))
    data = {"format": "coco", "paths": [str(world / "captions_train.json")], "image_root": str(world)}
    evals = [EvalSet(name="test", captions=str(world / "captions_test.json"), questions=str(world / "questions_test.json"),
                     annotations=str(world / "annotations_test.json"), images=str(world),
                     image_pattern="images/world_test_{image_id:07d}.png", tasks=["vqa"])]
    # tiny-mlp-opt and tiny-linear-opt with EVA's tiny tower (fake.assembly): no open_clip to import in each worker process
    runs = [RunSpec(name=name, assembly=fake.assembly(name), stage2_steps=2) for name in ("mlp", "linear")]
    return CompareConfig(name="messages", runs=runs, stage2_data=data, evals=evals, batch_size=4, output_dir=str(tmp_path / "out"),
                         generation={"num_beams": 1, "max_new_tokens": 2}, jobs=jobs, threads=1, device="cpu")


def test_fresh_runs_say_no_resume_or_reuse(tmp_path, capsys):
    said: list[str] = []
    run_compare(_config(tmp_path, jobs=1), say=said.append)
    text = "\n".join(said) + capsys.readouterr().err
    assert "no checkpoint under" not in text and "reusing its results" not in text
    said.clear()
    run_compare(_config(tmp_path, jobs=1), say=said.append)  # now stored: reused, and said so
    assert sum("reusing its results" in line for line in said) == 2


def test_worker_runs_feed_the_overall_progress(tmp_path, capsys):
    said: list[str] = []
    run_compare(_config(tmp_path, jobs=2), say=said.append)
    text = "\n".join(said) + capsys.readouterr().err
    assert "reusing its results" not in text and "no checkpoint under" not in text
    progress = [line for line in said if line.startswith("[compare ")]
    assert any(line.endswith("· mlp seed 0: stage 2") for line in progress), progress
    assert any(line.endswith("· linear seed 0: evaluate") for line in progress), progress
    assert re.fullmatch(r"\[compare #+ 100%\] \d+:\d\d spent · done", progress[-1]), progress[-1]


def test_a_changed_evaluation_rescores_without_retraining(tmp_path, capsys):
    """Changing only an evaluation setting (here the generation length) threw the trained stage 2
    away ("holds a run made with other settings"); the kept checkpoint is now scored again."""
    import json

    said: list[str] = []
    run_compare(_config(tmp_path, jobs=1), say=said.append)
    checkpoint = tmp_path / "out" / "runs" / "mlp" / "seed-0" / "stage2" / "checkpoints" / "step-2" / "connector.safetensors"
    before = checkpoint.stat().st_mtime_ns
    config = _config(tmp_path, jobs=1).model_copy(update={"generation": {"num_beams": 1, "max_new_tokens": 3}})
    said.clear()
    run_compare(config, say=said.append)
    text = "\n".join(said)
    assert "starting it afresh" not in text and "reusing its results" not in text  # re-scored, not retrained
    assert checkpoint.stat().st_mtime_ns == before
    stored = json.loads((tmp_path / "out" / "runs" / "mlp" / "seed-0" / "result.json").read_text())
    assert stored["result"]["train"]["stage2"]["steps"] == 2


def test_changed_images_retrain_and_rescore(tmp_path):
    """compare's keys fingerprinted the annotation files only: pictures replaced under the same names
    reused the old results (and stage 1s and retrieval scores) without a word."""
    from PIL import Image

    said: list[str] = []
    run_compare(_config(tmp_path, jobs=1), say=said.append)
    said.clear()
    run_compare(_config(tmp_path, jobs=1), say=said.append)
    assert sum("reusing its results" in line for line in said) == 2
    test_image = sorted((tmp_path / "world" / "images").glob("world_test_*.png"))[0]
    Image.new("RGB", Image.open(test_image).size, (5, 200, 5)).save(test_image)  # an evaluation image changes
    said.clear()
    run_compare(_config(tmp_path, jobs=1), say=said.append)
    text = "\n".join(said)
    assert "reusing its results" not in text and "starting it afresh" not in text  # re-scored, training kept
    train_image = sorted((tmp_path / "world" / "images").glob("world_train_*.png"))[0]
    Image.new("RGB", Image.open(train_image).size, (200, 5, 5)).save(train_image)  # a training image changes
    said.clear()
    run_compare(_config(tmp_path, jobs=1), say=said.append)
    assert sum("starting it afresh" in line for line in said) == 2  # trained again on the new pictures
