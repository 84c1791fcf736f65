"""Task prompts as the LLM reads them: one place for both generation (inference) and the stage-2
objective, so a prompt is formatted the same way in training and at test time."""

from __future__ import annotations

from typing import Any, Sequence


def format_prompts(llm: Any, prompts: Sequence[str]) -> list[str]:
    """Task prompts as the LLM reads them (its template or chat format); unchanged for an LLM
    without `format_prompt`."""
    fmt = getattr(llm, "format_prompt", None)
    return [fmt(prompt) for prompt in prompts] if fmt is not None else list(prompts)
