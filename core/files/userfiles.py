"""Reading the files users hand us: configs, annotations, manifests, a model directory's JSON.

Every way such a file can be unusable (missing, a directory, binary, not UTF-8, empty, malformed,
the wrong kind of value at the top) becomes one InputFileError naming the file, what is wrong and
what was expected, so no reader leaks a UnicodeDecodeError or a parser's traceback to the user.

A YAML file is always a config (settings: a few KB), so it is read only up to CONFIG_LIMIT, and its
aliases may not expand it past MAX_YAML_VALUES: a few lines of anchors can stand for billions of
values ("billion laughs"), which PyYAML builds as shared references and whatever walks the result
(validation, printing, saving) would then expand. JSON has no aliases (its parsed size follows its
byte size) and the same reader serves annotation files of hundreds of MB, so JSON is not capped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from vlbridge.errors import InputFileError

CONFIG_LIMIT = 2**20  # bytes of a YAML config; PyYAML parses pure Python (a MiB of short values takes ~30 s)
MAX_YAML_VALUES = 1_000_000  # a config holds hundreds; 1 MiB of YAML without aliases holds at most ~500K
_SNIFF = 8192  # a NUL byte this early means binary data, as git and grep judge it
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # what Windows tools write for "Unicode" text
_TOO_DEEP = "nested more deeply than Python's {kind} reader goes (hundreds of levels); a config or annotation file is flat"
_NAMES = {dict: ("a mapping", "an object"), list: ("a list", "an array"), str: ("a string",) * 2,  # (YAML, JSON)
          int: ("a number",) * 2, float: ("a number",) * 2, bool: ("true or false",) * 2, type(None): ("null",) * 2}


def fail(path: str | os.PathLike, what: str, problem: str, joiner: str = ": ") -> InputFileError:
    """The error for `problem` in the file at `path` (the caller raises it)."""
    return InputFileError(f"{what} {str(path)!r}{joiner}{problem}", str(path), problem)


def check_file(path: str | os.PathLike, what: str) -> Path:
    """The path, if it names an existing file; else an InputFileError saying what is there instead."""
    path = Path(path).expanduser()
    problem = not_a_file(path)
    if problem:
        raise fail(path, what, problem, " ")
    return path


def not_a_file(path: Path) -> str:
    """Why `path` names no file to read ("is a directory", "does not exist", a link to nothing), or ""."""
    if path.is_file():
        return ""
    if path.is_dir():
        return "is a directory; give the file itself"
    if path.is_symlink() and not path.exists():  # is_file follows links: a dangling one read as a missing file
        return f"is a broken link: it points to {os.readlink(path)!r}, which does not exist"
    if path.exists():
        return "is not a regular file (a device, pipe or socket); give a file"
    return "does not exist"


def decode(data: bytes, path: str | os.PathLike, what: str, kind: str, offset: int = 0, where: str = "") -> str:
    """`data` (the bytes at `offset` of the file) as UTF-8 text, or why it is not `kind` text.

    `where` ("line 3") places the problem inside the file when the file is read piece by piece.
    """
    at = f"{where}: " if where else ""
    if offset == 0 and data.startswith(_UTF16_BOMS):
        raise fail(path, what, f"{at}UTF-16 text, not UTF-8; save it as UTF-8 {kind}")
    nul = data.find(b"\0", 0, _SNIFF)
    if nul >= 0:
        raise fail(path, what, f"{at}binary data (a NUL byte at byte offset {offset + nul}), not {kind} text; "
                               f"give a UTF-8 {kind} file")
    try:
        return data.decode("utf-8-sig" if offset == 0 else "utf-8")  # a leading BOM (Notepad) is harmless
    except UnicodeDecodeError as exc:
        byte = data[exc.start]
        raise fail(path, what, f"{at}not UTF-8 (byte 0x{byte:02x} at byte offset {offset + exc.start}); "
                               f"save it as UTF-8 {kind}") from None


def read_text(path: str | os.PathLike, what: str, kind: str = "text", limit: int | None = None) -> str:
    """The whole file as UTF-8 text; `kind` ("YAML", "JSON") says what the text should be. A file
    over `limit` bytes is refused, having read no more than that."""
    path = check_file(path, what)
    try:
        with path.open("rb") as handle:
            data = handle.read() if limit is None else handle.read(limit + 1)
    except OSError as exc:
        raise fail(path, what, f"cannot be read ({exc.strerror or exc})", " ") from None
    if limit is not None and len(data) > limit:
        size, most = path.stat().st_size, f"{limit / 2**20:g} MiB"
        shown = f"{size / 2**20:.1f} MiB" if size >= limit * 1.1 else f"{size:,} bytes"  # just over: 1.0 MiB would read as the limit
        raise fail(path, what, f"is {shown if size > limit else 'over ' + most}; a {kind} config is at most "
                               f"{most} (its settings take a few KB): give the config file itself", " ")
    return decode(data, path, what, kind)


def read_json(path: str | os.PathLike, what: str, top: type | None = None) -> Any:
    """A whole JSON file; malformed JSON is reported by line and column, `top` checks the outer value."""
    text = read_text(path, what, "JSON")
    if not text.strip():
        raise fail(path, what, "empty; expected JSON")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(path, what, f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise fail(path, what, _TOO_DEEP.format(kind="JSON")) from None
    return check_top(value, top, path, what, "JSON")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: plain
    PyYAML keeps the last one, so a setting written twice would silently lose one of them."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):  # an unhashable key: the base class reports it
                continue
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping (lines {seen[key]} and {line}); keep one of them")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike, what: str, top: type | None = None) -> Any:
    """A whole YAML config file; a file without a document (empty, or only comments) is an error too."""
    value = parse_yaml(read_text(path, what, "YAML", CONFIG_LIMIT), path, what)
    if value is None:
        raise fail(path, what, "empty (no YAML document in it, only blank lines or comments); write the settings into it")
    return check_top(value, top, path, what, "YAML")


def parse_yaml(text: str, path: str | os.PathLike, what: str) -> Any:
    """`text` (the file at `path`) as a YAML config (None without a document); malformed YAML, nesting
    deeper than Python recurses and aliases expanding past MAX_YAML_VALUES are InputFileErrors."""
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded = expanded_values(node, MAX_YAML_VALUES)
        if expanded > MAX_YAML_VALUES:
            raise fail(path, what, f"its aliases (*name) expand it to more than {MAX_YAML_VALUES:,} values (a \"billion laughs\"); "
                                   "a config holds hundreds: write the repeated settings out instead")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).replace(' in "<unicode string>", line', " at line").split())  # the file is named already
        raise fail(path, what, f"malformed YAML: {reason}") from None
    except RecursionError:
        raise fail(path, what, _TOO_DEEP.format(kind="YAML")) from None
    finally:
        loader.dispose()


def expanded_values(root: yaml.Node, limit: int) -> int:
    """How many values the document under `root` holds with every alias written out in full (counted
    without expanding, stopping at limit + 1); a ConstructorError for an alias inside its own anchor."""
    sizes: dict[int, int] = {}  # id(node) -> its expanded count, once all its children are counted
    open_nodes: set[int] = set()  # entered and not yet counted: meeting one again is a loop
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_counted = stack.pop()
        children = [v for pair in node.value for v in pair] if isinstance(node, yaml.MappingNode) else (
            node.value if isinstance(node, yaml.SequenceNode) else [])
        if children_counted:
            open_nodes.discard(id(node))
            sizes[id(node)] = min(limit + 1, 1 + sum(sizes[id(child)] for child in children))
        elif id(node) in open_nodes:
            raise yaml.constructor.ConstructorError(None, None, "an alias refers to the anchored value it is inside of "
                                                    "(a loop no config can hold)", node.start_mark)
        elif id(node) not in sizes:
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
    return sizes[id(root)]


def check_top(value: Any, top: type | None, path: str | os.PathLike, what: str, kind: str) -> Any:
    """`value` if it is a `top` (or no type was asked for); else an error naming both kinds."""
    if top is None or isinstance(value, top):
        return value
    column = 1 if kind == "JSON" else 0
    wanted = _NAMES.get(top, (top.__name__,) * 2)[column]
    found = _NAMES.get(type(value), (type(value).__name__,) * 2)[column]
    raise fail(path, what, f"expected {wanted} at the top level, found {found}")
