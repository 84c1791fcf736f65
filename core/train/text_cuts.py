"""How many texts an objective cut at `max_text_tokens`, and how many kept no target token.

BLIP-2 (LAVIS) cuts every text at 32 tokens without a word (stage 1: Q-Former tokens; stage 2: LLM tokens). A caption cut short still teaches its
first tokens, but a row whose prompt alone fills the budget teaches nothing: every label is
masked. The objective counts both as it tokenises; the trainer sums the counts over the ranks and
says so once per run, naming the setting that gives the texts more room.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

SETTING = "objective.max_text_tokens"  # the config key that gives the texts more room
COUNTS = ("rows", "cut", "untaught")  # the fields summed over the ranks


@dataclass
class TextCuts:
    """Counts over the texts an objective tokenised with at most `limit` tokens."""

    limit: int
    rows: int = 0
    cut: int = 0  # longer than the limit, so cut on the right
    untaught: int = 0  # left with no target token: the row adds nothing to the loss
    counting: bool = True  # False while a caller runs batches it does not count (evaluation's padding repeats)
    room: str = "the LLM's context must hold it with the visual tokens"  # what bounds a raised limit, for the warning

    def add(self, cut: torch.Tensor, untaught: torch.Tensor) -> None:
        """Fold in one batch: (B,) bool flags per row."""
        if not self.counting:
            return
        cut_rows, untaught_rows = torch.stack([cut.sum(), untaught.to(cut.device).sum()]).tolist()  # one device sync
        self.rows += int(cut.numel())
        self.cut += int(cut_rows)
        self.untaught += int(untaught_rows)

    def reset(self) -> None:
        """Count afresh (each evaluation counts its own texts)."""
        self.rows = self.cut = self.untaught = 0
        self.counting = True

    def counts(self) -> dict[str, float]:
        """The counts as floats, for `runtime.sum_over_ranks`."""
        return {name: float(getattr(self, name)) for name in COUNTS}

    def resume_counts(self, counts: Mapping[str, float]) -> None:
        """Take up the counts a checkpoint saved (`counts()` of this rank), so a resumed run's total is the run's."""
        for name in COUNTS:
            setattr(self, name, int(counts.get(name, 0)))

    def with_counts(self, counts: Mapping[str, float]) -> "TextCuts":
        """The same limit with other counts (e.g. summed over the ranks)."""
        return TextCuts(self.limit, **{name: int(counts.get(name, 0)) for name in COUNTS}, room=self.room)

    def summary(self, what: str = "texts") -> str:
        """'3 of 40 texts cut at objective.max_text_tokens 32; 1 left with no target token' ('' when none)."""
        if not self.cut and not self.untaught:
            return ""
        line = f"{self.cut} of {self.rows} {what} cut at {SETTING} {self.limit}"
        return line + (f"; {self.untaught} left with no target token" if self.untaught else "")

    def warning(self, what: str, so_far: bool) -> str:
        """The once-per-run warning: the counts (`so_far`: of a run still going), what they cost and how
        to give the texts more room."""
        lost = ""
        if self.untaught:
            lost = (f"; {self.untaught} kept no target token at all (the input alone fills the budget), so "
                    f"{'it adds' if self.untaught == 1 else 'they add'} nothing to any loss")
        return (f"warning: {'so far ' if so_far else ''}{self.cut} of {self.rows} {what} were cut at {SETTING} {self.limit} "
                f"and lost their last tokens{lost}. Raise {SETTING} (e.g. objective: {{max_text_tokens: {self.limit * 2}}}; "
                f"{self.room}) or shorten the texts (and any prompt)")


def cut_rows(llm: Any, texts: list[str], limit: int, mask: torch.Tensor) -> torch.Tensor:
    """(B,) bool: which texts `llm.tokenize(texts, max_length=limit)` cut, given that call's attention
    `mask`. Only a text that filled all `limit` tokens can have been cut, so only those are tokenised
    again, to limit + 1 (a cut one shows one token more, whatever special tokens the LLM adds): a
    batch of short texts costs no second tokenisation."""
    filled = mask.sum(dim=1) >= limit
    cut = torch.zeros_like(filled)
    rows = filled.nonzero().flatten().tolist()
    if rows:
        _, longer = llm.tokenize([texts[row] for row in rows], max_length=limit + 1, padding_side="right")
        cut[rows] = (longer.sum(dim=1) > limit).to(cut.device)
    return cut
