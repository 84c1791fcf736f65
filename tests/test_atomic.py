"""Files and folders vlbridge writes follow the umask (as save_pretrained's do), not tempfile's private modes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from vlbridge.files.atomic import atomic_write, atomic_write_text, current_umask, staging_dir
from vlbridge.files.checkpoint import ConnectorState
from vlbridge.train.checkpointing import save_training_checkpoint


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_current_umask_reads_the_process_umask(umask):
    assert current_umask() == umask


def test_atomic_files_follow_the_umask(tmp_path, umask):
    text = atomic_write_text(tmp_path / "a.json", "{}")
    binary = atomic_write(tmp_path / "model.safetensors", lambda tmp: tmp.write_bytes(b"x"))
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() gives: the reference
    assert _mode(text) == _mode(binary) == _mode(plain) == 0o666 & ~umask


def test_staging_folders_follow_the_umask(tmp_path, umask):
    folder = staging_dir(tmp_path, ".step-1.")
    plain = tmp_path / "plain"
    plain.mkdir()
    assert folder.name.startswith(".step-1.") and _mode(folder) == _mode(plain) == 0o777 & ~umask


def test_training_checkpoint_is_readable_by_the_group(tmp_path, umask):
    final = save_training_checkpoint(tmp_path, 3, assembly={"name": "x"}, connector=ConnectorState({"w": torch.zeros(2)}, []), stage=2,
                                     trainer_state={"epoch": 0}, config_yaml="steps: 3\n")
    assert _mode(final) == 0o777 & ~umask
    assert {p.name: _mode(p) for p in final.iterdir()} == {p.name: 0o666 & ~umask for p in final.iterdir()}
