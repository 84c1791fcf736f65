"""Caption tokenisation before scoring, as the COCO caption evaluation does it: Stanford's PTB
tokenizer (lower-cased, one caption per line), then the listed punctuation tokens dropped.

Scores depend on the tokenizer, so every result names the one used:

- ``java-ptb``: the Stanford CoreNLP 3.4.1 jar that ships inside pycocoevalcap, run with the same
  flags pycocoevalcap uses (needs pycocoevalcap installed and ``java`` on PATH). Numbers computed
  with it are comparable with published COCO numbers.
- ``python-ptb-approx``: a pure-Python imitation of that tokenizer for machines without Java. It
  agrees on ordinary captions (punctuation, quotes, brackets, contractions, abbreviations) but is
  not the real thing; treat its scores as close, not equal.
- ``none``: the text is already tokenised; it is only split on whitespace and re-joined.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Hashable, Mapping, Sequence, TypeVar

from vlbridge.errors import VLBridgeError

JAVA_PTB, PYTHON_PTB, NO_TOKENIZER = "java-ptb", "python-ptb-approx", "none"
TOKENIZERS = ("auto", JAVA_PTB, PYTHON_PTB, NO_TOKENIZER)
JAR_NAME = "stanford-corenlp-3.4.1.jar"
# The tokens the COCO evaluation drops after PTB tokenisation. The bracket tokens are listed in
# upper case while the tokenizer lower-cases, so "-lrb-" and friends survive: kept for parity.
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"])

K = TypeVar("K", bound=Hashable)


def ptb_jar() -> Path | None:
    """The CoreNLP jar inside an installed pycocoevalcap, or None."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        jar = Path(location) / "tokenizer" / JAR_NAME
        if jar.is_file():
            return jar
    return None


def java_available() -> bool:
    return shutil.which("java") is not None


def resolve_tokenizer(name: str = "auto") -> str:
    """"auto" -> java-ptb when the jar and Java are present, else python-ptb-approx."""
    if name not in TOKENIZERS:
        raise VLBridgeError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")
    if name == "auto":
        return JAVA_PTB if ptb_jar() is not None and java_available() else PYTHON_PTB
    if name == JAVA_PTB and ptb_jar() is None:
        raise VLBridgeError("tokenizer 'java-ptb' needs pycocoevalcap (it holds the CoreNLP jar): "
                            "pip install 'vlbridge[eval]', or use --tokenizer python-ptb-approx")
    if name == JAVA_PTB and not java_available():
        raise VLBridgeError("tokenizer 'java-ptb' needs a Java runtime on PATH (e.g. apt-get install default-jre-headless), "
                            "or use --tokenizer python-ptb-approx")
    return name


def tokenize_captions(captions: Mapping[K, Sequence[str]], tokenizer: str = "auto") -> tuple[dict[K, list[str]], str]:
    """Tokenise every caption of every key; returns the tokenised captions and the tokenizer's name."""
    name = resolve_tokenizer(tokenizer)
    keys = [key for key, texts in captions.items() for _ in texts]
    lines = [_one_line(text) for texts in captions.values() for text in texts]
    if name == JAVA_PTB:
        tokenised = java_ptb_tokenize(lines)
    elif name == PYTHON_PTB:
        tokenised = [python_ptb_tokenize(line) for line in lines]
    else:
        tokenised = [" ".join(line.split()) for line in lines]
    out: dict[K, list[str]] = {key: [] for key in captions}
    for key, text in zip(keys, tokenised):
        out[key].append(text)
    return out, name


def _one_line(text: str) -> str:
    if not isinstance(text, str):
        raise VLBridgeError(f"captions must be strings, got {type(text).__name__} {text!r:.60}")
    return re.sub(r"[\r\n\x0b\x0c\x85\u2028\u2029]", " ", text)  # one caption per line for the Java tokenizer


def java_ptb_tokenize(lines: Sequence[str]) -> list[str]:
    """Run CoreNLP's PTBTokenizer over the lines (as pycocoevalcap does), then drop PUNCTUATIONS."""
    jar = ptb_jar()
    if jar is None or not java_available():
        raise VLBridgeError("the Java PTB tokenizer needs pycocoevalcap and a Java runtime")
    if not lines:
        return []
    with tempfile.TemporaryDirectory(prefix="vlbridge-ptb-") as tmp:
        source = Path(tmp) / "captions.txt"
        source.write_bytes("\n".join(_one_line(line) for line in lines).encode("utf-8"))
        command = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", str(source)]
        done = subprocess.run(command, capture_output=True, check=False, cwd=tmp)
    if done.returncode != 0:
        raise VLBridgeError(f"the Java PTB tokenizer failed (exit {done.returncode}): {done.stderr.decode(errors='replace')[-500:]}")
    out = done.stdout.decode("utf-8", errors="replace").split("\n")
    while len(out) > len(lines) and not out[-1].strip():
        out.pop()
    if len(out) != len(lines):
        raise VLBridgeError(f"the Java PTB tokenizer returned {len(out)} lines for {len(lines)} captions")
    return [" ".join(t for t in line.rstrip().split(" ") if t not in PUNCTUATIONS) for line in out]


# -- the pure-Python approximation ----------------------------------------------------------------
# Rules observed from the real tokenizer's output (see the module docstring); not a port of it.
_CHAR_MAP = {"\u201c": ' " ', "\u201d": ' " ', "\u2018": "'", "\u2019": "'", "\u2026": " ... ", "\u2013": " -- ",
             "\u2014": " -- ", "(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ",
             "}": " -rcb- ", '"': ' " ', "&amp;": "&"}
_SPECIAL = {"cannot": "can not", "gonna": "gon na", "wanna": "wan na", "gotta": "got ta", "gimme": "gim me",
            "lemme": "lem me", "'twas": "'t was", "'tis": "'t is", "y'all": "y' all"}
_KEEP_LEADING_QUOTE = re.compile(r"^'(em|n|\d+s?|s|re|ve|ll|d|m)$")
_ABBREVIATIONS = frozenset("mr mrs ms dr st jr sr vs etc inc co corp ltd mt ft ave jan feb mar apr jun jul aug sep sept "
                           "oct nov dec prof gen sgt capt col lt rev".split())
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_BRACKETS = frozenset(["-lrb-", "-rrb-", "-lsb-", "-rsb-", "-lcb-", "-rcb-"])
_INNER_SPLIT = re.compile(r"(?<!\d),|,(?!\d)|;|--|\.\.\.")


def python_ptb_tokenize(text: str) -> str:
    """A PTB-like tokenisation of one caption: lower-cased, punctuation split off and then dropped."""
    text = _one_line(text).lower()
    for char, replacement in _CHAR_MAP.items():
        text = text.replace(char, replacement)
    text = _INNER_SPLIT.sub(lambda m: f" {m.group(0)} ", text)
    tokens: list[str] = []
    for chunk in text.split():
        tokens.extend(_split_chunk(chunk))
    return " ".join(t for t in tokens if t not in PUNCTUATIONS and t != '"')


def _split_chunk(chunk: str) -> list[str]:
    if chunk in _SPECIAL:
        return _SPECIAL[chunk].split()
    if chunk in _BRACKETS or chunk in ("...", "--", "-", '"'):
        return [chunk]
    leading, chunk = _peel_leading(chunk)
    chunk, trailing = _peel_trailing(chunk)
    if chunk in _SPECIAL:
        middle = _SPECIAL[chunk].split()
    else:
        clitic = _CLITIC.match(chunk)
        middle = [clitic.group(1), clitic.group(2)] if clitic else ([chunk] if chunk else [])
    return leading + middle + trailing


def _peel_leading(chunk: str) -> tuple[list[str], str]:
    peeled: list[str] = []
    while len(chunk) > 1:
        if chunk[0] in "$#~@`":
            peeled.append(chunk[0])
        elif chunk[0] == "'" and not _KEEP_LEADING_QUOTE.match(chunk) and chunk not in _SPECIAL:
            peeled.append("'")
        else:
            break
        chunk = chunk[1:]
    return peeled, chunk


def _peel_trailing(chunk: str) -> tuple[str, list[str]]:
    peeled: list[str] = []
    while len(chunk) > 1:
        run = re.search(r"[!?]+$", chunk)
        if run:
            token = run.group(0)
        elif chunk[-1] in ",:;%/'":
            token = chunk[-1]
        elif chunk[-1] == "." and not _is_abbreviation(chunk):
            token = "."
        else:
            break
        peeled.insert(0, token)
        chunk = chunk[: -len(token)]
    return chunk, peeled


def _is_abbreviation(word: str) -> bool:
    """"p.m.", "u.s.", "e.g.", single letters ("b.") and known short forms keep their period."""
    stem = word[:-1]
    return bool(re.fullmatch(r"[a-z]", stem) or re.fullmatch(r"[a-z]+(\.[a-z]+)+", stem) or stem in _ABBREVIATIONS)
