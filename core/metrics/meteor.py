"""METEOR 1.5 through pycocoevalcap's wrapper (a Java program with a paraphrase table: not something to
re-implement). Optional: without pycocoevalcap or Java the score is None and the reason is returned."""

from __future__ import annotations

import contextlib
import io
from typing import Sequence

from vlbridge.metrics.tokenize import java_available

UNAVAILABLE_NO_PACKAGE = "METEOR skipped: pycocoevalcap is not installed (pip install 'vlbridge[eval]')"
UNAVAILABLE_NO_JAVA = "METEOR skipped: no Java runtime on PATH (METEOR 1.5 is a Java program)"


def meteor_unavailable() -> str | None:
    """Why METEOR cannot run here, or None when it can."""
    try:
        import pycocoevalcap.meteor.meteor  # noqa: F401
    except ImportError:
        return UNAVAILABLE_NO_PACKAGE
    if not java_available():
        return UNAVAILABLE_NO_JAVA
    return None


def meteor(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float | None, str | None]:
    """METEOR's corpus score (its own aggregate, not a mean of per-image scores), or (None, reason).

    Inputs are tokenised strings. The Java process starts here (about 7 s: it loads the
    paraphrase table) and is closed before returning.
    """
    reason = meteor_unavailable()
    if reason is not None:
        return None, reason
    from pycocoevalcap.meteor.meteor import Meteor

    gts = {i: [r.replace("|||", " ") for r in refs] for i, refs in enumerate(references)}  # "|||" separates fields
    res = {i: [c.replace("|||", " ")] for i, c in enumerate(candidates)}
    scorer = None
    try:
        scorer = Meteor()
        with contextlib.redirect_stdout(io.StringIO()):
            score, _ = scorer.compute_score(gts, res)
    except Exception as exc:  # the wrapper fails in odd ways (e.g. "could not convert string to float: ''")
        return None, f"METEOR failed: {type(exc).__name__}: {exc}"
    finally:
        del scorer  # its __del__ ends the Java process
    return float(score), None
