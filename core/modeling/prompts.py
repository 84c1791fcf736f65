"""Task prompts as the LLM reads them: one place for both generation (inference) and the stage-2
objective, so a prompt is formatted the same way in training and at test time."""

from __future__ import annotations

from typing import Any, Sequence

from vlbridge.errors import PluginError
from vlbridge.plugin.contract import plugin_call


def format_prompts(who: str, llm: Any, prompts: Sequence[str]) -> list[str]:
    """Task prompts as the LLM reads them (its template or chat format); unchanged for an LLM
    without `format_prompt`. `who` names the LLM when its format_prompt answers other than a string."""
    fmt = getattr(llm, "format_prompt", None)
    if fmt is None:
        return list(prompts)
    texts = [plugin_call(who, f"format_prompt({prompt!r:.60})", fmt, prompt) for prompt in prompts]
    wrong = [text for text in texts if not isinstance(text, str)]
    if wrong:
        raise PluginError(f"{who}: format_prompt(prompt) returned a {type(wrong[0]).__name__} ({wrong[0]!r:.60}); "
                          "it must return the prompt's text, a string (docs/writing-plugins.md, 5.4)")
    return texts


def template_problem(template: str, what: str, example: str = "Question: {} Short answer:") -> str | None:
    """Why `template` is not a format string with exactly one `{}` (and only doubled literal braces),
    or None when it is: one check for every template a user writes (VQA prompts, prompt templates)."""
    if template.count("{}") != 1:
        return f"{what} must hold '{{}}' exactly once, where the text goes; got {template!r} (e.g. {example!r})"
    try:
        template.format("")
    except (IndexError, KeyError, ValueError) as exc:
        return (f"{what} {template!r} has braces other than its one '{{}}' ({type(exc).__name__}: {exc}); "
                "write literal braces doubled, '{{' and '}}'")
    return None
