"""Training checkpoints: `output_dir/checkpoints/step-N/` plus a `latest` pointer written last.

A step directory is a vlbridge checkpoint (`vlbridge.load(dir)` works on it: connector.safetensors
with the connector's whole state, trained in this stage or not,
assembly.yaml, checkpoint.json, and encoder.safetensors / lora.safetensors when fine-tuning trains
them) plus what resuming needs: `trainer_state.safetensors` (optimizer, scheduler, GradScaler, every
rank's RNG states and data position, counters) and `train.yaml` (the config).
The trainer state holds only tensors and plain Python values, written as safetensors with the rest
as JSON (files.state_file), so resuming unpickles nothing. A step of a run written before that holds
`trainer_state.pt` instead, which is still resumed, read with `torch.load(weights_only=True)`.
A directory is built under a temporary name and renamed into place, so a killed run leaves either
a whole checkpoint or none.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from vlbridge.files.atomic import atomic_write, atomic_write_text, staging_dir
from vlbridge.files.checkpoint import META_FILE, ConnectorState, ExtraPart, write_checkpoint
from vlbridge.files.checkpoint_paths import (LATEST, OLD_TRAINER_STATE, RUN_CHECKPOINTS, TRAINER_STATE, latest_checkpoint,
                                             older_checkpoint_advice, step_dirs, trainer_state_file)
from vlbridge.errors import InputFileError, VLBridgeError
from vlbridge.files.state_file import read_header, read_state, write_state
from vlbridge.files.userfiles import CONFIG_LIMIT, parse_yaml, read_text
from vlbridge.files.weights import torch_load

CHECKPOINTS = RUN_CHECKPOINTS
CONFIG_FILE = "train.yaml"
LOCK_FILE = ".lock"
STATE_FORMAT, STATE_VERSION = "vlbridge-trainer-state", 1  # the trainer state's "format", and the newest "version" this code reads


# -- one run per output_dir ----------------------------------------------------------------------
@contextlib.contextmanager
def exclusive(output_dir: str | Path, hold: bool = True) -> Iterator[None]:
    """Hold output_dir/.lock for the run, so a second run on the same directory fails at once
    instead of interleaving checkpoints. The OS releases it when the process dies, even by SIGKILL;
    the next holder removes the half-written checkpoint folders such a death leaves."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        hold = False
    if not hold:
        yield
        return
    path = Path(output_dir) / LOCK_FILE
    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not _same_file(handle, path):  # the run before removed it between our open and our lock
                raise BlockingIOError
        except BlockingIOError:
            handle.seek(0)
            raise VLBridgeError(_held_message(output_dir, handle.read().strip())) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        remove_staging(output_dir)  # ours now: what a killed run left half-written goes
        try:
            yield
        finally:  # on every way out: remove the lock file while still holding it, then release it
            path.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)
            if created:  # a run that failed before writing anything leaves no empty output_dir behind
                with contextlib.suppress(OSError):  # not empty: it keeps what the run wrote
                    path.parent.rmdir()


def _held_message(output_dir: str | Path, pid: str) -> str:
    """Who holds the lock. A run killed a moment ago can still hold it through the processes it
    forked (data-loader or compare workers share its lock until they notice and exit)."""
    if pid.isdigit() and not _alive(int(pid)):
        return (f"output_dir {output_dir} is still locked by the processes started by pid {pid}, which has ended "
                "(its data-loader or worker processes exit within seconds); retry in a moment")
    return f"output_dir {output_dir} is in use by another run (pid {pid or '?'}); wait for it to end or choose another output_dir"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _same_file(handle, path: Path) -> bool:
    """The open lock file is still the one at `path` (not unlinked by a finishing run)."""
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


# -- random number generators ------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """This process's python, numpy, torch CPU and CUDA generator states, as plain values and tensors."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put the generators back where `capture_rng` found them."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- writing -----------------------------------------------------------------------------------
def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step}"


def save_training_checkpoint(
    output_dir: str | Path, step: int, *, assembly: dict[str, Any], connector: ConnectorState, stage: int,
    trainer_state: dict[str, Any], config_yaml: str, keep_last: int | None = None, parts: Sequence[ExtraPart] = (),
    trained_stages: Sequence[int] = (),
) -> Path:
    """Write step-N atomically, then point `latest` at it, then drop checkpoints beyond `keep_last`.
    `trained_stages`: those the connector went through before this run (its init_from's)."""
    with _write_errors(output_dir, step):
        return _save(output_dir, step, assembly=assembly, connector=connector, stage=stage, trainer_state=trainer_state,
                     config_yaml=config_yaml, keep_last=keep_last, parts=parts, trained_stages=trained_stages)


@contextlib.contextmanager
def _write_errors(output_dir: str | Path, step: int) -> Iterator[None]:
    """A full disk, a quota, a read-only or vanished folder while saving is the user's to fix, not a
    bug: said as such, with the checkpoint that is still whole to resume from once it is fixed."""
    try:
        yield
    except OSError as exc:
        try:
            kept = latest_checkpoint(output_dir)
        except VLBridgeError:
            kept = None
        resume = (f"the latest complete checkpoint is still {kept.name} ({kept.parent / LATEST} names it): free space or "
                  "fix the folder, then continue with --resume" if kept is not None else "no earlier checkpoint of this run was saved")
        where = f" ({exc.filename})" if exc.filename else ""
        raise VLBridgeError(f"cannot save checkpoint step-{step} under {Path(output_dir) / CHECKPOINTS}: "
                            f"{exc.strerror or exc}{where}; {resume}") from exc


def _save(
    output_dir: str | Path, step: int, *, assembly: dict[str, Any], connector: ConnectorState, stage: int,
    trainer_state: dict[str, Any], config_yaml: str, keep_last: int | None, parts: Sequence[ExtraPart],
    trained_stages: Sequence[int],
) -> Path:
    final = checkpoint_dir(output_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(final.parent, prefix=f".{final.name}.")
    try:
        write_checkpoint(staging, assembly, connector.tensors, stage, extra={"step": step, "epoch": trainer_state.get("epoch")},
                         parts=parts, absent=connector.absent, trained_stages=trained_stages)
        atomic_write(staging / TRAINER_STATE, lambda tmp: write_trainer_state(tmp, trainer_state))
        atomic_write_text(staging / CONFIG_FILE, config_yaml)
        if final.exists():  # left by a run that died before moving `latest` past it
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _fsync_dir(final.parent)
    atomic_write_text(final.parent / LATEST, final.name + "\n")
    if keep_last is not None:
        prune(output_dir, keep_last)
    return final


def write_trainer_state(path: str | Path, state: dict[str, Any]) -> None:
    """The resume state as safetensors, its format and version in the header (checked before decoding)."""
    write_state(path, state, header={"format": STATE_FORMAT, "version": str(STATE_VERSION)})


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prune(output_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (never the one `latest` names)."""
    latest = latest_checkpoint(output_dir)
    for _, path in step_dirs(output_dir)[:-keep_last]:
        if path != latest:
            discard(path)


def discard(path: Path) -> None:
    """Delete a step directory by first renaming it to a staging name: a run killed midway through the
    deletion leaves a folder the next run removes (`remove_staging`), not a step-N that has lost its
    weights but keeps its trainer state, and so still counts as complete (the way on from a damaged checkpoint)."""
    doomed = path.with_name(f".{path.name}.pruned.tmp")
    try:
        os.replace(path, doomed)
    except OSError:
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


def remove_staging(output_dir: str | Path) -> None:
    """Remove half-written checkpoint directories a killed run left behind."""
    root = Path(output_dir) / CHECKPOINTS
    for path in root.glob(".step-*.tmp") if root.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)


# -- reading (the run's layout itself, latest_checkpoint and step_dirs, is read in files.checkpoint_paths) ---------
def load_trainer_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """The resume state of a step directory: its trainer_state.safetensors, or an older run's
    trainer_state.pt (weights_only: tensors and plain values only)."""
    path = trainer_state_file(Path(ckpt_dir))
    if path is None:
        raise VLBridgeError(f"{ckpt_dir} holds no trainer state ({TRAINER_STATE}, or {OLD_TRAINER_STATE} from an older "
                            "vlbridge), so it is not a complete training checkpoint")
    if path.name == OLD_TRAINER_STATE:
        state = torch_load(path)
        header = state if isinstance(state, dict) else {}
        _check_header(path, header.get("format"), header.get("version"))
    else:
        header = read_header(path)
        version = header.get("version")
        _check_header(path, header.get("format"), int(version) if isinstance(version, str) and version.isdigit() else version)
        state = read_state(path)
    if not isinstance(state, dict):
        raise VLBridgeError(f"{path} holds a {type(state).__name__}, not a vlbridge trainer state (a dict); the file was edited")
    return state


def _check_header(path: Path, format_: object, version: object) -> None:
    if format_ != STATE_FORMAT:
        raise VLBridgeError(f"{path} is not a vlbridge trainer state (format {STATE_FORMAT!r})")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= STATE_VERSION:
        # its layout is unknown here: reading it anyway could resume with a wrong position or die on a missing key
        raise VLBridgeError(f"{path}: trainer state version {version!r} is not one this vlbridge reads (1 to {STATE_VERSION}); "
                            "a newer vlbridge wrote it (upgrade to resume), or the file was edited")


def load_saved_config(ckpt_dir: str | Path) -> dict[str, Any]:
    """The config a step directory was trained with (its train.yaml), which a resume compares with."""
    path, what = Path(ckpt_dir) / CONFIG_FILE, "the checkpoint's training config"
    text = read_text(path, what, "YAML", CONFIG_LIMIT)
    try:
        saved = parse_yaml(text, path, what)  # aliases checked, as in every config: a resume walks the whole of it
    except InputFileError as exc:
        raise VLBridgeError(f"{path} is not the training config a checkpoint saves ({exc.problem})") from None
    if not isinstance(saved, dict):
        raise VLBridgeError(f"{path} is not the training config a checkpoint saves (it is empty, cut short or not YAML)")
    return saved


@contextlib.contextmanager
def readable(output_dir: str | Path, ckpt_dir: Path) -> Iterator[None]:
    """Reading the checkpoint a run resumes from: a file of it that cannot be read (truncated by a
    full disk, emptied, damaged in a copy) is said with the way on, from an older complete checkpoint."""
    try:
        yield
    except VLBridgeError as exc:
        raise VLBridgeError(f"cannot resume from {ckpt_dir}, a file of it cannot be read: {exc}; "
                            f"{older_checkpoint_advice(output_dir, ckpt_dir)}") from exc


def resolve_weights(path: str | Path) -> Path:
    """A checkpoint directory from either a step directory or a run's output_dir (its `latest`)."""
    path = Path(path).expanduser()
    if (path / META_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise VLBridgeError(f"init_from: {path} is neither a checkpoint directory (no {META_FILE}) nor a run with checkpoints/{LATEST}")
    return latest
