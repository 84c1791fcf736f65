"""A save that the file system refuses (a full disk, a quota, a read-only folder) ends the run as a
user error (exit 2) naming the checkpoint and the one still whole to resume from, never as an
'internal error: this is a bug'; the earlier checkpoint stays loadable and the run resumes from it.
And a run killed while deleting an old checkpoint (keep_last) leaves none that looks complete."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tests.test_trainer_samples import config, write_caption_data, write_config
from vlbridge.cli.main import main
from vlbridge.train import checkpointing

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_full_disk_during_a_save_is_a_user_error_and_keeps_the_earlier_checkpoint(tmp_path, monkeypatch, capsys):
    data = write_caption_data(tmp_path / "data", images=4)
    path = write_config(tmp_path / "t.yaml", config(data, tmp_path / "run", steps=4, save_every=2))
    save, saves = checkpointing.write_state, []

    def full_disk(path, *args, **kwargs):
        saves.append(path)
        if len(saves) > 1:  # step-2's trainer state is written, step-4's is not
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(path, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "write_state", full_disk)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "cannot save checkpoint step-4" in err and "No space left on device" in err
    assert "still step-2" in err and "internal error" not in err
    checkpoints = tmp_path / "run" / checkpointing.CHECKPOINTS
    assert checkpointing.latest_checkpoint(tmp_path / "run") == checkpoints / "step-2"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-2"]  # no half-written step-4 left
    monkeypatch.setattr(checkpointing, "write_state", save)
    assert main(["train", str(path), "--resume"]) == 0
    assert checkpointing.latest_checkpoint(tmp_path / "run") == checkpoints / "step-4"


def test_a_run_killed_while_pruning_leaves_no_step_that_lost_its_weights(tmp_path, monkeypatch):
    """rmtree killed midway left step-N without connector.safetensors but with its trainer state: a
    'complete' checkpoint that the advice after a damaged latest one would point to."""
    from vlbridge.files.checkpoint_paths import step_dirs

    checkpoints = tmp_path / "run" / checkpointing.CHECKPOINTS
    for step in (1, 2):
        folder = checkpoints / f"step-{step}"
        folder.mkdir(parents=True)
        for name in ("connector.safetensors", checkpointing.TRAINER_STATE):
            (folder / name).write_bytes(b"x")
    (checkpoints / "latest").write_text("step-2\n")
    rmtree = checkpointing.shutil.rmtree

    def killed(path, ignore_errors=False):
        (Path(path) / "connector.safetensors").unlink()  # the first file goes, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.prune(tmp_path / "run", keep_last=1)
    monkeypatch.setattr(checkpointing.shutil, "rmtree", rmtree)
    assert [path.name for _, path in step_dirs(tmp_path / "run")] == ["step-2"]
    checkpointing.remove_staging(tmp_path / "run")  # what the next run's lock does
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-2"]
