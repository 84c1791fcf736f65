"""WebDataset tar shards as img2dataset writes them: `KEY.jpg` + `KEY.txt` + `KEY.json` per sample.

Shards are read by the `webdataset` library (the field's reader: local paths, `pipe:` commands and
URLs it can open; nothing is extracted to disk). A sample is the run of consecutive members sharing
a key, split off by webdataset's own rule (its `base_plus_ext`): the key is the name up to the first
dot after the last slash, folders included, the rest its field (`a.b.jpg` is field `b.jpg` of key
`a`). The image is the field `jpg` (`jpeg`, `png`, `webp`), else the one field ending so. Every text
member is a caption of it (`txt`, then `en.txt`, `alt.txt`... in name order), each one (image, caption)
pair under one image id, as a JSON file's several captions of an image are; without a non-blank one,
the "caption" of `json` (what LAVIS reads). Samples without an image or a caption, with a member
repeated, and shards that break off, come out as `Skipped` so they can be counted; so does a caption
member that is not UTF-8, left out while the sample trains on its other captions. A sample's image
id is its shard and key (`tar_image_id`: unambiguous whatever ':' either holds), so equal keys in two
shards (two img2dataset outputs both start at 000000000) stay two images. `webdataset` imports torch,
so it is imported only when a shard is read: listing and validating shards stays torch-free.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from braceexpand import braceexpand

from vlbridge.data.records import DataError, ImageRef, ImageText, Skipped

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_BACKWARDS_RE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_URL_RE = re.compile(r"^(pipe:|[a-z][a-z0-9+.-]+://)")  # two letters at least: "C:/x.tar" is a path
_GLOB_RE = re.compile(r"[*?\[]")
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz


def expand_braces(pattern: str) -> list[str]:
    """`shard-{00000..00002}.tar` -> three names (zero-padded as written); `{a,b}` -> two (webdataset's braceexpand).

    A backwards range is refused: braceexpand would count down, which a typo rarely means.
    """
    for low, high in _BACKWARDS_RE.findall(pattern):
        if int(high) < int(low):
            raise DataError(f"shard pattern {pattern!r}: range {{{low}..{high}}} runs backwards; write {{{high}..{low}}}")
    return list(braceexpand(pattern))


def is_url(name: str) -> bool:
    """A `pipe:` command or a URL (http://, s3://...): webdataset opens it; it cannot be checked beforehand."""
    return _URL_RE.match(name) is not None


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """A shard list from paths, globs, brace patterns and URLs (entries may also be joined with "::").

    Globs must match something and every explicit or brace-expanded local shard must exist; `pipe:`
    commands and URLs are kept as written (brace-expanded) and fail, if they do, when read.
    """
    entries = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    shards: list[str] = []
    missing: list[str] = []
    for entry in entries:
        for part in str(entry).split("::"):
            for name in expand_braces(part if is_url(part) else os.path.expanduser(part)):
                if is_url(name):
                    shards.append(name)
                elif _GLOB_RE.search(name):
                    matches = sorted(glob.glob(name))
                    if not matches:
                        raise DataError(f"shard glob {name!r} matches no file")
                    shards.extend(matches)
                elif Path(name).is_file():
                    shards.append(name)
                elif Path(name).is_dir():
                    raise DataError(f"{name!r} is a folder; give its shards, e.g. the glob {str(Path(name) / '*.tar')!r}")
                else:
                    missing.append(name)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        raise DataError(f"{len(missing)} shard file{'s' if len(missing) > 1 else ''} not found: {shown}{', ...' if len(missing) > 5 else ''}")
    if not shards:
        raise DataError("no shards given; list tar files, a glob or a pattern like 'shards/{00000..00009}.tar'")
    not_tars = [name for name in shards if not is_url(name) and not _opens_as_tar(name)]
    if not_tars:
        shown = ", ".join(repr(n) for n in not_tars[:5])
        raise DataError(f"{len(not_tars)} shard file{'s are' if len(not_tars) > 1 else ' is'} not a tar archive: {shown}"
                        f"{', ...' if len(not_tars) > 5 else ''}; webdataset shards are .tar files (plain or compressed) "
                        "of samples whose members share a key (e.g. 000001.jpg + 000001.txt)")
    return shards


def _opens_as_tar(path: str) -> bool:
    """Whether the file starts as a tar (tarfile reads its first header, through gzip, bz2 or xz);
    a tar cut short later still opens, and is skipped and counted where it breaks off."""
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def iter_shard(url: str) -> Iterator[ImageText | Skipped]:
    """Stream one tar through webdataset: an ImageText per complete sample, a Skipped per incomplete
    one, and a Skipped for the shard when it cannot be opened or breaks off (what was read before stays)."""
    from webdataset.tariterators import tar_file_expander, url_opener

    errors: list[Exception] = []

    def stop(exc: Exception) -> bool:  # webdataset's handler: remember the error, stop this shard
        errors.append(exc)
        return False

    members = [0]
    files = tar_file_expander(url_opener([{"url": url}], handler=stop), handler=stop)
    yield from group_members(url, _counted(files, members))
    if errors:
        reason = f"unreadable tar (stopped after {members[0]} members): {errors[0]}"
        yield Skipped(name=url, reason=reason, kind="unreadable tar")
    elif not _ends_cleanly(url):
        reason = f"no end-of-archive block after {members[0]} members: the tar is truncated or corrupt there"
        yield Skipped(name=url, reason=reason, kind="unreadable tar")


def group_members(url: str, members: Iterable[dict[str, Any]]) -> Iterator[ImageText | Skipped]:
    """webdataset's member dicts -> samples, grouped as its `group_by_keys` groups them (consecutive
    members whose `base_plus_ext` key is equal; fields lower-cased), with two differences: a member
    repeated within a sample skips that sample, where webdataset stops the shard (its default handler
    raises "duplicate file name"); and a member without a key (no dot after the last slash, or a
    leading dot), which webdataset drops unseen, is counted."""
    from webdataset.tariterators import base_plus_ext

    shard_id = shard_identity(url)  # once per shard: a real path costs a stat of every folder above it
    key: str | None = None
    fields: dict[str, bytes] = {}
    repeated: list[str] = []
    for member in members:
        if not member:  # webdataset's end-of-shard marker
            continue
        name = member["fname"]
        base, field = base_plus_ext(name)
        if base is None:
            yield Skipped(name=f"{url}:{name}", kind="no image", reason=f"member {name!r} has no key: webdataset names members "
                          "KEY.FIELD, the key ending at the first dot after the last '/' (e.g. 000001.jpg)")
            continue
        if base != key:
            if key is not None:
                yield from _sample(url, shard_id, key, fields, repeated)
            key, fields, repeated = base, {}, []
        if field.lower() in fields:
            repeated.append(name)
        else:
            fields[field.lower()] = member["data"]
    if key is not None:
        yield from _sample(url, shard_id, key, fields, repeated)


def _sample(url: str, shard_id: str, key: str, fields: dict[str, bytes], repeated: list[str]) -> list[ImageText | Skipped]:
    """A complete sample's pairs (one per caption, then a Skipped per caption member it could not read),
    or the one Skipped saying why there are none."""
    if repeated:
        return [Skipped(name=f"{url}:{key}", kind="repeated member", reason=f"shard {url!r}, key {key!r}: member {repeated[0]!r} "
                       "appears twice in the sample, so which copy belongs to it is unknown (webdataset refuses it as a "
                       "'duplicate file name'); write each member once")]
    made = make_samples(url, key, fields, shard_id)
    return [made] if isinstance(made, Skipped) else list(made)


def _counted(files: Iterable[dict[str, Any]], count: list[int]) -> Iterator[dict[str, Any]]:
    """Pass webdataset's member dicts through, counting members (not its end-of-shard markers)."""
    for member in files:
        count[0] += bool(member)
        yield member


def _ends_cleanly(url: str) -> bool:
    """Whether a local uncompressed tar has its zero end block where its last member ends.

    tarfile (under webdataset too) ends a stream quietly at a cut or damaged header, so truncation
    would go unnoticed; the headers are walked again (seeks, no data read) to find that point.
    Compressed tars and streams (`pipe:`, URLs) cannot be checked without reading them twice; they are trusted.
    """
    path = url.removeprefix("file:")
    if is_url(url) or not Path(path).is_file():
        return True
    with open(path, "rb") as handle:
        if handle.read(6).startswith(_COMPRESSED_MAGIC):
            return True
        try:
            with tarfile.open(path, mode="r:") as tar:
                tar.getmembers()
                offset = tar.offset
        except (tarfile.TarError, OSError):
            return False
        handle.seek(offset)
        block = handle.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0")


def make_samples(shard: str, key: str, files: dict[str, bytes], shard_id: str | None = None) -> list[ImageText | Skipped] | Skipped:
    """One sample's fields -> an ImageText per caption (one image, its bytes shared), and a Skipped per
    caption member that is not UTF-8 (left out and counted); or why it cannot be one (a sample with
    no readable caption); `shard_id`: `shard_identity(shard)`, where the caller has it already.

    Every text member is a caption of the image (`caption_fields`), as the captions of one image in a
    JSON file are: a pair each, one image id, each other's `image_captions`. Blank ones are none (img2dataset
    writes an empty .txt for a row without a caption); without any, the .json's "caption" is. An explicit
    (`text_input`, `text_output`) pair in the .json makes the sample that one pair, as a JSONL line is.
    """
    name = f"{shard}:{key}"
    image, images = _field(files, IMAGE_EXTENSIONS)
    if image is None:
        found = ", ".join("." + ext for ext in sorted(files))
        why = f"{len(images)} images ({', '.join(images)})" if images else "no image"
        return Skipped(name=name, kind="no image", reason=f"{why} (members: {found}; expected one .jpg, .jpeg, .png or .webp)"
                       f"{_dotted_hint(key, files)}")
    json_field, _ = _field(files, ("json",))
    meta = _metadata(files.get(json_field) if json_field else None)
    fields = caption_fields(files)
    texts, unreadable = _read_captions(files, fields)
    captions = [text for text in texts if text]
    if not captions and isinstance(meta.get("caption"), str) and meta["caption"].strip():
        captions = [meta["caption"]]
    if isinstance(meta.get("text_input"), str) and isinstance(meta.get("text_output"), str):
        captions = captions[:1] or [""]  # one instruction pair, however many captions travel with it
    elif not captions:
        if not isinstance(meta.get("text_output"), str):  # instruction data needs no caption, as in JSONL
            if unreadable:  # the caption it has cannot be read: that is why there is none
                return Skipped(name=name, kind="unreadable text", reason=f"{unreadable[0][1]}; write captions as UTF-8")
            return Skipped(name=name, kind="no text", reason=f"no text ({_why_no_text(fields, files, json_field, meta)})"
                                                             f"{_dotted_hint(key, files)}")
        captions = [""]
    member = f"{key}.{image}"
    ref = ImageRef(name=f"{shard}:{member}", data=files[image], tar_member=(shard, member))
    image_id = tar_image_id(shard_id or shard_identity(shard), key)
    every = tuple(captions)
    left_out = [Skipped(name=f"{name}.{field}", kind="unreadable text", reason=f"{why}; left out, the sample is read without it "
                        "(write captions as UTF-8)") for field, why in unreadable]
    return [*(ImageText(ref, text, image_id, meta, image_captions=every) for text in captions), *left_out]


def _read_captions(files: dict[str, bytes], fields: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The caption members' texts, and (field, why) for each that is not UTF-8: it is left out, not
    decoded with replacements (that trained on mojibake without a word), and not the end of the
    sample's other captions."""
    texts: list[str] = []
    unreadable: list[tuple[str, str]] = []
    for field in fields:
        try:
            texts.append(files[field].decode("utf-8").strip())
        except UnicodeDecodeError as exc:
            byte = files[field][exc.start]
            unreadable.append((field, f"its .{field} member is not UTF-8 text (byte 0x{byte:02x} at offset {exc.start})"))
    return texts, unreadable


def caption_fields(files: dict[str, bytes]) -> list[str]:
    """The fields that are captions of the image: `txt`, then every other field ending `.txt` (`en.txt`,
    `alt.txt`, `0.txt`) in name order: a fixed order, whatever order the members were written in."""
    return sorted((field for field in files if field.rpartition(".")[2] == "txt"), key=lambda field: (field != "txt", field))


def _why_no_text(fields: list[str], files: dict[str, bytes], json_field: str | None, meta: dict[str, Any]) -> str:
    """What a sample's .txt and .json hold instead of a caption (empty .txt members, a 'caption' that is a number...)."""
    if len(fields) == 1:
        txt = f"its .{fields[0]} member is {'blank' if files[fields[0]] else 'empty'}"  # spaces alone are no caption either
    else:
        txt = f"{len(fields)} .txt members ({', '.join(fields)}), all of them blank" if fields else "no .txt member"
    caption = meta.get("caption")
    if json_field is None:
        return f"{txt}, and no .json"
    if caption is None:
        return f"{txt}, and no 'caption' in its .{json_field}"
    if not isinstance(caption, str):
        return f"{txt}, and its .{json_field} 'caption' is {type(caption).__name__} {caption!r:.40}, not text"
    return f"{txt}, and its .{json_field} 'caption' is blank"


def _field(files: dict[str, bytes], extensions: Sequence[str]) -> tuple[str | None, list[str]]:
    """(the field to read, the candidates): an exact field (`jpg`), else the one field ending so
    (`b.jpg`, how webdataset's decoders tell a field's type); several such: (None, them)."""
    exact = next((ext for ext in extensions if ext in files), None)
    if exact is not None:
        return exact, [exact]
    found = sorted(field for field in files if field.rpartition(".")[2] in extensions)
    return (found[0] if len(found) == 1 else None), found


def _dotted_hint(key: str, files: dict[str, bytes]) -> str:
    """Why the fields of a key with dots are not what its writer meant, and the way out."""
    dotted = sorted(field for field in files if "." in field)
    if not dotted:
        return ""
    shown = ", ".join(f"{key}.{field}" for field in dotted[:4])
    return (f"; webdataset ends a key at the first dot of the file name, so {shown} are fields of the one sample {key!r}: "
            "write keys without dots (e.g. a_b.jpg for a.b.jpg)")


def shard_identity(url: str) -> str:
    """A shard as image ids name it: the real path of a local file (the same however it is written),
    else the URL or `pipe:` command as given."""
    path = url.removeprefix("file:")
    return os.path.realpath(path) if not is_url(url) and Path(path).is_file() else url


def tar_image_id(shard_id: str, key: str) -> str:
    """A tar sample's image id, `SHARD:KEY`: the shard's identity with '%' and ':' percent-escaped, so
    that the first ':' ends it whatever the key holds (paths, `pipe:` and URLs have ':' too)."""
    return f"{shard_id.replace('%', '%25').replace(':', '%3A')}:{key}"


def split_tar_image_id(image_id: str) -> tuple[str, str]:
    """(shard identity, key) of a `tar_image_id`."""
    shard, _, key = image_id.partition(":")
    return shard.replace("%3A", ":").replace("%25", "%"), key


def _metadata(raw: bytes | None) -> dict[str, Any]:
    """img2dataset's per-sample JSON (url, caption, sizes...); unreadable metadata is simply absent."""
    if raw is None:
        return {}
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
