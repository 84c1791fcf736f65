"""WebDataset tar shards as img2dataset writes them: `KEY.jpg` + `KEY.txt` + `KEY.json` per sample.

Shards are streamed with the standard library's `tarfile` (nothing is extracted to disk). A sample
is the run of consecutive members sharing a key (the name up to its first dot, folders included);
the caption is `KEY.txt`, else the "caption" of `KEY.json` (what LAVIS reads). Samples without an
image or a caption, and shards that break off, come out as `Skipped` so they can be counted.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

from vlbridge.data.records import DataError, ImageRef, ImageText, Skipped

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_BRACE_RE = re.compile(r"\{([^{}]*)\}")
_RANGE_RE = re.compile(r"(\d+)\.\.(\d+)")
_MEMBER_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_GLOB_RE = re.compile(r"[*?\[]")
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz


def expand_braces(pattern: str) -> list[str]:
    """`shard-{00000..00002}.tar` -> three names (the width of the first bound is kept); `{a,b}` -> two."""
    match = _BRACE_RE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    bounds = _RANGE_RE.fullmatch(body)
    if bounds:
        low, high = bounds.groups()
        if int(high) < int(low):
            raise DataError(f"shard pattern {pattern!r}: range {{{body}}} runs backwards; write {{{high}..{low}}}")
        options = [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise DataError(f"shard pattern {pattern!r}: {{{body}}} is neither a range {{00000..00009}} nor a list {{a,b}}")
    return [name for option in options for name in expand_braces(head + option + tail)]


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """A shard list from paths, globs and brace patterns (entries may also be joined with "::").

    Globs must match something and every explicit or brace-expanded shard must exist.
    """
    entries = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    shards: list[str] = []
    missing: list[str] = []
    for entry in entries:
        for part in str(entry).split("::"):
            for name in expand_braces(os.path.expanduser(part)):
                if _GLOB_RE.search(name):
                    matches = sorted(glob.glob(name))
                    if not matches:
                        raise DataError(f"shard glob {name!r} matches no file")
                    shards.extend(matches)
                elif Path(name).is_file():
                    shards.append(name)
                else:
                    missing.append(name)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        raise DataError(f"{len(missing)} shard file{'s' if len(missing) > 1 else ''} not found: {shown}{', ...' if len(missing) > 5 else ''}")
    if not shards:
        raise DataError("no shards given; list tar files, a glob or a pattern like 'shards/{00000..00009}.tar'")
    return shards


def iter_shard(path: str) -> Iterator[ImageText | Skipped]:
    """Stream one tar: an ImageText per complete sample, a Skipped per incomplete one or on a read error."""
    members = 0
    try:
        with tarfile.open(path, mode="r|*") as tar:
            key: str | None = None
            files: dict[str, bytes] = {}
            for member in tar:
                parts = _MEMBER_RE.match(member.name) if member.isfile() else None
                if parts is None:
                    continue  # folders, links and names without an extension belong to no sample
                if parts.group(1) != key:
                    if key is not None:
                        yield make_sample(path, key, files)
                    key, files = parts.group(1), {}
                handle = tar.extractfile(member)
                files[parts.group(2).lower()] = handle.read() if handle is not None else b""
                members += 1
            end = tar.offset
            if key is not None:
                yield make_sample(path, key, files)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        yield Skipped(name=path, reason=f"unreadable tar (stopped after {members} members): {exc}", kind="unreadable tar")
        return
    if not _ends_cleanly(path, end):
        reason = f"no end-of-archive block after {members} members: the tar is truncated or corrupt there"
        yield Skipped(name=path, reason=reason, kind="unreadable tar")


def _ends_cleanly(path: str, offset: int) -> bool:
    """Whether an uncompressed tar has its zero end block where tarfile stopped reading.

    tarfile ends a stream quietly at a cut or damaged header, so truncation would go unnoticed.
    Compressed tars cannot be checked without decompressing them twice; they are trusted.
    """
    with open(path, "rb") as handle:
        if handle.read(6).startswith(_COMPRESSED_MAGIC):
            return True
        handle.seek(offset)
        block = handle.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0")


def make_sample(shard: str, key: str, files: dict[str, bytes]) -> ImageText | Skipped:
    """One sample's members -> an ImageText (image bytes, caption, metadata), or why it cannot be one."""
    name = f"{shard}:{key}"
    meta = _metadata(files.get("json"))
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in files), None)
    if image_ext is None:
        found = ", ".join("." + ext for ext in sorted(files))
        return Skipped(name=name, reason=f"no image (members: {found}; expected .jpg, .jpeg, .png or .webp)", kind="no image")
    if "txt" in files:
        text: Any = files["txt"].decode("utf-8", errors="replace").strip()
    else:
        text = meta.get("caption")
    if not isinstance(text, str):
        return Skipped(name=name, reason="no text (neither a .txt member nor a 'caption' in .json)", kind="no text")
    return ImageText(ImageRef(name=f"{name}.{image_ext}", data=files[image_ext]), text, key, meta)


def _metadata(raw: bytes | None) -> dict[str, Any]:
    """img2dataset's per-sample JSON (url, caption, sizes...); unreadable metadata is simply absent."""
    if raw is None:
        return {}
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
