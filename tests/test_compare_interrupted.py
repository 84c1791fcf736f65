"""A comparison interrupted in the middle of a training stage resumes that stage from a checkpoint
made along the way, not from its first step: compare's trainings saved only at their end, so a
Ctrl-C lost every step of the stage it hit (the module promises training resumes from its last
checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlbridge.compare.config import CompareConfig, EvalSet, RunSpec
from vlbridge.compare.run import run_compare
from vlbridge.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 10


def _config(tmp_path: Path) -> CompareConfig:
    from vlbridge.world import WorldConfig, generate_world

    world = tmp_path / "world"
    generate_world(world, WorldConfig(train=8, val=0, test=3, comp=0, questions_per_image=2, image_size=32))
    data = {"format": "coco", "paths": [str(world / "captions_train.json")], "image_root": str(world), "num_workers": 0}
    evals = [EvalSet(name="test", questions=str(world / "questions_test.json"), annotations=str(world / "annotations_test.json"),
                     images=str(world), image_pattern="images/world_test_{image_id:07d}.png", tasks=["vqa"])]
    return CompareConfig(name="interrupted", runs=[RunSpec(name="mlp", assembly="tiny-mlp-opt", stage2_steps=STEPS)], stage2_data=data,
                         evals=evals, batch_size=4, output_dir=str(tmp_path / "out"), features=False,
                         generation={"num_beams": 1, "max_new_tokens": 2}, jobs=1, threads=1, device="cpu")


def test_an_interrupted_stage_resumes_from_a_checkpoint_made_along_the_way(tmp_path, monkeypatch, capsys):
    config = _config(tmp_path)
    steps_run: list[int] = []
    original = Trainer.train_step

    def counted(self: Trainer) -> None:
        if self.step == 7 and not steps_run.count(-1):  # Ctrl-C in the eighth step, once
            steps_run.append(-1)
            raise KeyboardInterrupt
        steps_run.append(self.step)
        original(self)

    monkeypatch.setattr(Trainer, "train_step", counted)
    with pytest.raises(KeyboardInterrupt):
        run_compare(config, say=lambda line: None)
    steps_run.clear()
    steps_run.append(-1)
    run_compare(config, say=lambda line: None)
    assert steps_run[1:] == [7, 8, 9], steps_run  # steps 0-6 were kept, none is repeated
    assert "resuming from" in capsys.readouterr().err
    kept = sorted(p.name for p in (tmp_path / "out" / "runs" / "mlp" / "seed-0" / "stage2" / "checkpoints").iterdir())
    assert kept == ["latest", f"step-{STEPS}"]  # only the newest checkpoint is kept
