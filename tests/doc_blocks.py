"""The blocks a reader runs, as the docs test finds them: every fenced ```bash, ```python and ```yaml
block of README.md, docs/*.md and the READMEs under examples/, the commands that the comments of
examples/*.yaml give (their "From the repository root:" lists) and those YAML files themselves.

Kept apart from tests/test_docs.py so that what counts as a block, a file or a skip is decided in
one place. A block is skipped only under a marker directly above it that says why,
`<!-- docs-test: skip (the reason) -->`; a marker without a reason, or not directly above a
block that would run, is an error, so a skip cannot go unexplained or outlive its block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

LANGUAGES = ("bash", "python", "yaml")
FENCE = re.compile(r"^```([\w-]*)\s*$")
MARKER = re.compile(r"<!--\s*docs-test\b")
SKIP = re.compile(r"^<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]*)\)\s*-->$")
# A first line "# vlbridge_pool/plugin.py" or "# my-assembly.yaml" names the file the block is.
FILE_HEADER = re.compile(r"^# ([\w/-]+\.(?:py|yaml))\s*$")
# Comment lines of an example YAML that give a command: "#   vlbridge train ..." (indented).
COMMENT_COMMAND = re.compile(r"^#\s{2,}((?:vlbridge|torchrun|python|pip)\s.*)$")


class DocsMarkupError(ValueError):
    """A docs-test marker that cannot be honoured as written."""


@dataclass(frozen=True)
class Block:
    """One runnable block and where it stands (`README.md:123`), with its skip reason if marked."""

    source: str
    lang: str
    text: str
    skip: str | None = None

    @property
    def file(self) -> str | None:
        """The relative path the block is meant to be saved as, when its first line names one."""
        lines = self.text.splitlines()
        match = FILE_HEADER.match(lines[0]) if lines else None
        return match.group(1) if match else None


def markdown_blocks(path: Path, root: Path) -> list[Block]:
    """The bash/python/yaml blocks of one markdown file, in order (other fences are prose)."""
    rel = path.relative_to(root).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    skip: str | None = None
    i = 0
    while i < len(lines):
        if MARKER.search(lines[i]):
            skip = _skip_reason(lines, i, rel)
            i += 1
            continue
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = _closing_fence(lines, i, rel)
        lang = fence.group(1)
        if lang in LANGUAGES:
            blocks.append(Block(f"{rel}:{i + 1}", lang, "\n".join(lines[i + 1:end]) + "\n", skip))
        elif skip is not None:
            raise DocsMarkupError(f"{rel}:{i}: a docs-test skip marker above a ```{lang} block, which is never run; "
                                  f"remove the marker (only {', '.join(LANGUAGES)} blocks run)")
        skip = None
        i = end + 1
    return blocks


def _skip_reason(lines: list[str], i: int, rel: str) -> str:
    match = SKIP.match(lines[i].strip())
    if not match or not match.group("reason").strip():
        raise DocsMarkupError(f"{rel}:{i + 1}: write a docs-test marker as `<!-- docs-test: skip (why it cannot run) -->` "
                              f"with its reason; got {lines[i].strip()!r}")
    if i + 1 >= len(lines) or not FENCE.match(lines[i + 1]):
        raise DocsMarkupError(f"{rel}:{i + 1}: a docs-test skip marker must stand on the line directly above the "
                              "fenced block it skips")
    return match.group("reason").strip()


def _closing_fence(lines: list[str], start: int, rel: str) -> int:
    for j in range(start + 1, len(lines)):
        if lines[j].strip() == "```":
            return j
    raise DocsMarkupError(f"{rel}:{start + 1}: a fenced block that is never closed (no ``` line after it)")


def example_yaml_blocks(path: Path, root: Path) -> list[Block]:
    """An example config as a yaml block, and the commands its comments give as one bash block."""
    rel = path.relative_to(root).as_posix()
    text = path.read_text(encoding="utf-8")
    commands = [m.group(1) for m in map(COMMENT_COMMAND.match, text.splitlines()) if m]
    blocks = [Block(f"{rel} (comments)", "bash", "\n".join(commands) + "\n")] if commands else []
    return blocks + [Block(rel, "yaml", text)]


def documented_blocks(root: Path) -> list[Block]:
    """Every block of the repository's documentation, in the order a reader meets them."""
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md")), *sorted((root / "examples").rglob("README.md"))]
    blocks = [b for page in pages for b in markdown_blocks(page, root)]
    return blocks + [b for path in sorted((root / "examples").glob("*.yaml")) for b in example_yaml_blocks(path, root)]
