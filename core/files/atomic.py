"""Write files so that a crash never leaves a half-written one: write beside, fsync, then rename.

tempfile makes its files 0600 and folders 0700 (private, for /tmp); what lands in a user's models
folder must follow the umask instead, like any file `open()` or `save_pretrained` writes, so a group
that shares the folder can read it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` then move tmp_path over `path` in one rename (same directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # after `write`: a writer may replace the file (safetensors makes it 0600)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def staging_dir(parent: str | Path, prefix: str) -> Path:
    """A fresh hidden folder in `parent` to fill and then rename into place, with the umask's mode."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
    os.chmod(folder, 0o777 & ~current_umask())
    return folder


def aside_name(folder: Path) -> Path:
    """Where `replace_folder` keeps the folder it replaces until the new one is in place (hidden, beside it)."""
    return folder.with_name(f".{folder.name}.old")


def replace_folder(new: Path, old: Path) -> None:
    """Put folder `new` where `old` is: `old` renamed aside, `new` renamed in, then the old files go.
    A crash between the renames leaves the old folder whole, aside (remove `aside_name(old)` at start)."""
    aside = aside_name(old)
    shutil.rmtree(aside, ignore_errors=True)
    if old.exists():
        os.rename(old, aside)
    os.rename(new, old)
    shutil.rmtree(aside, ignore_errors=True)


def current_umask() -> int:
    """The process umask, read from /proc where it can be (setting it to read it back races with threads)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def held_files(out: str | Path) -> list[str]:
    """The names in folder `out` (empty when it does not exist); NotADirectoryError, saying what
    stands there instead, for a file or a link to nothing."""
    path = Path(out).expanduser()
    if path.is_symlink() and not path.exists():
        raise NotADirectoryError(f"{path} is a link to {os.readlink(path)}, which does not exist")
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file")
    return sorted(child.name for child in path.iterdir()) if path.is_dir() else []


def into_new_folder(out: str | Path, fill: Callable[[Path], object]) -> Path:
    """Call `fill(folder)` on a hidden staging folder beside `out`, then rename it to `out` (or, where
    `out` is an existing empty folder, move what it holds into it), so that an interrupted export
    leaves nothing under the name the user gave (a folder with weights but no processor loads in one
    class and fails in the other). The caller checks that `out` is absent or empty (`held_files`)."""
    out = Path(out).expanduser().absolute()  # "." has no name to stage beside
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = staging_dir(out.parent, f".{out.name or 'out'}.")
    try:
        fill(stage)
        if out.is_dir():  # an empty folder the user made (or ".", or a link to one): the files move into it
            for child in sorted(stage.iterdir()):
                os.rename(child, out / child.name)
            stage.rmdir()
        else:
            os.rename(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out
