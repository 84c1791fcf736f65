"""`--model vlbridge`: any vlbridge model (a checkpoint directory, an imported transformers/LAVIS/
LLaVA checkpoint, or an assembly) as an lmms-eval model.

lmms-eval finds this class through the `lmms_eval.models` entry point (`vlbridge.lmms.manifest`);
Python code builds it with `VLBridgeLMM.wrap(model)` and hands it to `lmms_eval.evaluator.simple_evaluate`.
Requests are read by `vlbridge.lmms.requests`, generated through the model's own batched generation
(so an answer equals `model.generate`/`model.answer` on the same image and prompt) and scored by
`vlbridge.lmms.likelihood`.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms
from loguru import logger
from pydantic import ValidationError

from vlbridge.errors import VLBridgeError
from vlbridge.lmms.likelihood import continuation_scores
from vlbridge.lmms.options import PromptSettings, WrapperOptions
from vlbridge.lmms.requests import (Request, TaskRefused, clean_text, generation_settings, one_image, read_generation,
                                    read_likelihood, stop_at)
from vlbridge.modeling.inference import GenerationOptions, generate_batched


def process_position() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process: torch.distributed's when it is set up, else the
    environment accelerate and torchrun give every process (RANK, WORLD_SIZE, LOCAL_RANK)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return rank, world, int(os.environ.get("LOCAL_RANK", 0))


def open_model(options: WrapperOptions, local_rank: int) -> Any:
    """The model the options name, on this process's device (cuda -> cuda:LOCAL_RANK under DDP)."""
    from vlbridge.modeling.factory import build, load
    from vlbridge.parts.devices import resolve_device
    from vlbridge.files.checkpoint_source import resolve_checkpoint

    device = resolve_device(options.device, local_rank=local_rank, option="device")
    if options.checkpoint is not None:
        source = resolve_checkpoint(options.checkpoint, "checkpoint=")
        if source.note:
            logger.warning(source.note)
        return load(source.directory, stage=2, device=device, random_weights=options.random_weights)
    return build(options.assembly, stage=2, weights=options.weights, device=device, random_weights=options.random_weights)


class VLBridgeLMM(lmms):
    """A vlbridge model answering lmms-eval's requests: generate_until (batched), loglikelihood, and
    generate_until_multi_round (one image and one prompt per round)."""

    is_simple = True

    def __init__(self, checkpoint: str | None = None, assembly: str | None = None, batch_size: int | str = 8,
                 max_batch_size: int | None = None, model: Any = None, **options: Any) -> None:
        super().__init__()
        settings = {"batch_size": _batch_size(batch_size), **options}
        self._rank, self._world_size, local_rank = process_position()
        if model is None:
            parsed = _parsed(WrapperOptions, {"checkpoint": checkpoint, "assembly": assembly, **settings})
            model = open_model(parsed, local_rank)
            self.autocast = parsed.dtype
        else:
            parsed = _parsed(PromptSettings, settings)
            self.autocast = "auto"
        self.settings: PromptSettings = parsed
        self.model = model.eval()
        self.warned: set[str] = set()

    @classmethod
    def wrap(cls, model: Any, **settings: Any) -> "VLBridgeLMM":
        """An lmms-eval model around a model already built or loaded (prompt, batch_size, max_new_tokens)."""
        return cls(model=model, **settings)

    # -- what lmms-eval reads -------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def docs(self, task: str, split: str) -> Any:
        return self.task_dict[task][split]

    # -- requests -------------------------------------------------------------------------------------
    def generate_until(self, requests: list) -> list[str]:
        """Answers in request order, batched per task and generation settings, cut at `until`."""
        read = [read_generation(r.args, self.docs, self.settings.max_new_tokens) for r in requests]
        self._say_ignored(read)
        answers: list[str | None] = [None] * len(read)
        for indices in _groups(read):
            first = read[indices[0]]
            texts = self._generate([read[i].image for i in indices], [read[i].text for i in indices], first.generation)
            for i, text in zip(indices, texts):
                answers[i] = stop_at(text, read[i].until)
        for request, answer in zip(requests, answers):
            self.cache_hook.add_partial("generate_until", request.args[:2], answer)
        return [a for a in answers if a is not None]

    def loglikelihood(self, requests: list) -> list[GenerationResult]:
        """(-log P(continuation | image, prompt), greedy would produce it) per request, each pair in a
        GenerationResult.

        The first element is the negative log-probability (summed over the continuation's tokens)
        because lmms-eval 0.7 picks a multiple-choice answer by the *smallest* first element (its
        own models return a loss there; lmms-eval issue #370): a log-probability would make it pick
        the least likely choice. log P is its negation. The pair travels in lmms-eval's own
        GenerationResult because 0.7.3's evaluator turns a bare (float, bool) tuple into its str()."""
        read = [read_likelihood(r.args, self.docs) for r in requests]
        with self._precision():
            scores = continuation_scores(self.model, [r.image for r in read], [self._prompt(r) for r in read],
                                         [r.continuation for r in read], self.batch_size)
        return [GenerationResult(text=(-logprob, greedy)) for logprob, greedy in scores]  # type: ignore[arg-type]

    def generate_until_multi_round(self, requests: list) -> list[tuple[str, ...]]:
        """Round by round: the task's doc_to_text gives each round's image and text from the answers so
        far; every round is one generation on one image, as generate_until."""
        return [self._rounds(request) for request in requests]

    # -- helpers --------------------------------------------------------------------------------------
    def _prompt(self, request: Request) -> str:
        return self.settings.prompt.format(request.text)

    def _generate(self, images: list, texts: list[str], generation: dict[str, Any]) -> list[str]:
        prompts = [self.settings.prompt.format(text) for text in texts]
        try:
            options = GenerationOptions(**generation)
        except ValidationError as exc:
            raise VLBridgeError(f"lmms-eval generation_kwargs {generation}: {exc}") from None
        with self._precision():
            return generate_batched(self.model, images, prompts, options, self.batch_size)

    def _precision(self):
        from vlbridge.train.runtime import autocast

        return autocast(self.device, self.autocast) if self.autocast not in ("auto", "fp32") else nullcontext()

    def _rounds(self, request: Any) -> tuple[str, ...]:
        context, kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
        doc = self.docs(task, split)[doc_id]
        until, generation, _ = generation_settings(task, kwargs, self.settings.max_new_tokens)
        visuals, answers, info = doc_to_visual(doc), [], None
        for round_index in range(10_000):
            if round_index:
                visuals, context, done, _, info = doc_to_text(doc, previous_output=answers, round_idx=round_index,
                                                              previous_round_info=info)
                if done:
                    return tuple(answers)
            image = one_image(task, doc_id, visuals)
            answers.append(stop_at(self._generate([image], [clean_text(context)], generation)[0], until))
        raise TaskRefused(f"lmms-eval task {task!r} (doc {doc_id}) never signalled its last round")

    def _say_ignored(self, read: list[Request]) -> None:
        """Name, once per task, the generation settings other models read and vlbridge does not."""
        for request in read:
            if request.ignored and request.task not in self.warned:
                self.warned.add(request.task)
                logger.warning(f"vlbridge: task {request.task!r} sets {request.ignored} for other models; "
                               "they do not change a vlbridge answer")


def _groups(read: list[Request]) -> list[list[int]]:
    """Request indices grouped by task and generation settings (a batch shares one decoding), in order."""
    groups: dict[str, list[int]] = {}
    for i, request in enumerate(read):
        groups.setdefault(json.dumps([request.task, request.generation], sort_keys=True, default=str), []).append(i)
    return list(groups.values())


def _batch_size(value: int | str) -> int:
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return int(value)
    raise VLBridgeError(f"--batch_size {value!r}: the vlbridge model takes a number of requests per batch (e.g. 8), "
                        "not lmms-eval's auto sizing")


def _parsed(model: type, values: dict[str, Any]) -> Any:
    """Options checked by their pydantic model; a problem names the option and what is expected."""
    try:
        return model(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'model_args'}: {e['msg']}" for e in exc.errors())
        if any(e["type"] == "extra_forbidden" for e in exc.errors()):  # a misspelt name: say which names there are
            problems += f"; the vlbridge model takes {', '.join(model.model_fields)}"
        raise VLBridgeError(f"--model vlbridge: bad --model_args ({problems})") from None
