"""Where transformers' InstructBLIP keeps how long an instruction the Q-Former reads.

vlbridge cuts each instruction at the connector's `instruction_limit` Q-Former tokens
(`max_instruction_tokens`, LAVIS's 128, within the positions). transformers 5's InstructBlipProcessor
has no setting of its own for it: it tokenizes the instruction with the same text keywords as the
LLM's prompt, and cuts nothing unless those ask for truncation. Two saved settings make it cut
exactly where vlbridge does, by default:

- the Q-Former tokenizer's `model_max_length` (`qformer_tokenizer/`): where a truncating call cuts;
- `truncation: true` in the LLM tokenizer's config: the processor takes its tokenizer's init keywords
  as defaults for every tokenizer it calls (transformers' `ProcessorMixin._merge_kwargs`, step 5).

The LLM's prompt is then cut at its own tokenizer's `model_max_length` too: an unlimited one (1e30,
OPT's and the tiny tokenizers') cuts nothing; a limited one (FlanT5's 512) is named in a note. The
import reads both settings back, so an exported directory imports with the same cut.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

from vlbridge.files.userfiles import read_json
from vlbridge.interop.export_fidelity import LeftOutOfExportWarning

TRUNCATION = "truncation"  # the LLM tokenizer's init keyword the processor passes to both tokenizers
UNLIMITED = int(1e20)  # transformers' LARGE_INTEGER: a model_max_length above it means "no limit"
NO_CUT = (None, False, "do_not_truncate")  # truncation values that cut nothing


def instruction_tokenizer(connector: Any) -> Any:
    """A copy of the Q-Former's tokenizer that a truncating call cuts where vlbridge cuts."""
    tokenizer = copy.deepcopy(connector.tokenizer)
    tokenizer.model_max_length = connector.instruction_limit
    return tokenizer


def truncating_by_default(tokenizer: Any, fmt: str) -> None:
    """Save `tokenizer` (the processor's LLM tokenizer, a copy) with truncation on, so the processor
    cuts the instruction by default; note the LLM-prompt cut that comes with it where there is one."""
    tokenizer.init_kwargs[TRUNCATION] = True
    limit = tokenizer.model_max_length
    if limit is not None and limit <= UNLIMITED:
        warnings.warn(f"the {fmt} processor truncates by default (so that it cuts the instruction where vlbridge does), so it "
                      f"also cuts a prompt longer than the LLM tokenizer's model_max_length {limit} tokens, which vlbridge "
                      "does not", LeftOutOfExportWarning, stacklevel=3)


def processor_instruction_cut(src: Path) -> int | None:
    """The Q-Former tokens InstructBlipProcessor.from_pretrained(src) keeps of an instruction by
    default: the Q-Former tokenizer's model_max_length where the LLM tokenizer's config turns
    truncation on (as an export writes them); None where it cuts nothing (released checkpoints)."""
    llm = src / "tokenizer_config.json"
    if not llm.is_file() or read_json(llm, "the LLM tokenizer's config", top=dict).get(TRUNCATION) in NO_CUT:
        return None
    limit = read_json(src / "qformer_tokenizer" / "tokenizer_config.json", "the Q-Former tokenizer's config", top=dict).get("model_max_length")
    return limit if isinstance(limit, int) and limit <= UNLIMITED else None
