"""Write files so that a crash never leaves a half-written one: write beside, fsync, then rename.

tempfile makes its files 0600 and folders 0700 (private, for /tmp); what lands in a user's models
folder must follow the umask instead, like any file `open()` or `save_pretrained` writes, so a group
that shares the folder can read it.
"""

from __future__ import annotations

import os
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
