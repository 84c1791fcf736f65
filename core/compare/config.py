"""The comparison config: which assemblies, what data, what budget, which evaluations (no torch)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from vlbridge.data.config import load_data_config
from vlbridge.data.records import DataConfigError
from vlbridge.files.config_fields import MAX_SEED, PathText, StrictNumbers, listed_once
from vlbridge.lmms.options import LmmsEvalSpec
from vlbridge.modeling.prompts import template_problem


def checked_data(value: dict[str, Any] | None, where: str) -> dict[str, Any] | None:
    """A data mapping checked as the DataConfig it becomes, so a mistake is named before anything trains."""
    if value is not None:
        try:
            load_data_config(value, where)
        except DataConfigError as exc:
            raise ValueError("; ".join(p.removeprefix(f"{where}.") for p in exc.problems)) from None
    return value


def plain_file_name(value: str, names: str, example: str) -> str:
    """`value`, if it can name one file or folder (`names` says which) inside output_dir."""
    if "/" in value or "\\" in value or value.startswith(".") or any(ord(c) < 32 for c in value) or len(value.encode()) > 100:
        raise ValueError(f"{value!r} names {names}, so it may not contain '/' or '\\', start with '.', hold control "
                         f"characters or run past 100 bytes; e.g. {example!r}")
    return value


class Strict(StrictNumbers):
    model_config = ConfigDict(extra="forbid")


class RunSpec(Strict):
    """One contestant: an assembly and how its connector is trained."""

    name: str = Field(min_length=1, description="label in the table")
    assembly: PathText | dict[str, Any] | None = Field(None, description="preset name, assembly YAML path or inline mapping (not with checkpoint)")
    checkpoint: PathText | None = Field(None, description=(
        "evaluate this vlbridge checkpoint as it is, untrained here (e.g. an imported LLaVA-1.5 or BLIP-2: "
        "`vlbridge import hf-llava|hf-blip2`); its assembly is the checkpoint's own"))
    connector_options: dict[str, Any] = Field(default_factory=dict, description="merged into the assembly's connector options (e.g. num_query_tokens)")
    stage1_steps: int = Field(0, ge=0, description="stage-1 optimizer steps (0: no stage 1, e.g. projectors or the 'without stage 1' ablation)")
    init_from: PathText | None = Field(None, description=(
        "a stage-1 checkpoint directory stage 2 starts from instead of training a stage 1 here (BLIP-2's released "
        "pretrain checkpoints; the world's shipped ones); it also does the run's retrieval"))
    stage2_steps: int = Field(0, ge=0, description="stage-2 optimizer steps (at least 1 unless the run is a checkpoint)")
    lr: float | None = Field(None, gt=0, description="peak learning rate; default: the comparison's")
    group: str = Field("results", min_length=1, description="the report's table this run is a row of (e.g. zero-shot, supervised)")
    stage2_data: dict[str, Any] | None = Field(None, description="DataConfig for this run's stage 2; default: the comparison's stage2_data")

    @field_validator("stage2_data")
    @classmethod
    def _data(cls, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        return checked_data(value, str(info.field_name))

    @field_validator("name")
    @classmethod
    def _folder_name(cls, value: str) -> str:
        """The name is also the run's folder under output_dir/runs: one plain folder name."""
        return plain_file_name(value, "the run's folder under output_dir/runs", "qformer-32q")

    @model_validator(mode="after")
    def _check(self) -> "RunSpec":
        if self.checkpoint is not None:
            trains = [name for name in ("assembly", "stage1_steps", "stage2_steps", "lr", "stage2_data", "init_from")
                      if getattr(self, name)] + (["connector_options"] if self.connector_options else [])
            if trains:
                raise ValueError(f"run {self.name!r} evaluates checkpoint {self.checkpoint!r} as it is; drop {', '.join(trains)} "
                                 "(or drop checkpoint to train this run)")
        elif self.assembly is None:
            raise ValueError(f"run {self.name!r} needs an assembly to train, or a checkpoint to evaluate")
        elif self.stage2_steps < 1:
            raise ValueError(f"run {self.name!r} trains its connector: stage2_steps must be at least 1")
        elif self.init_from is not None and self.stage1_steps:
            raise ValueError(f"run {self.name!r} starts stage 2 from the stage-1 checkpoint {self.init_from!r} and also trains "
                             f"{self.stage1_steps} stage-1 steps; give one: init_from, or stage1_steps")
        return self


class EvalSet(Strict):
    """One evaluation split: captions (also used for retrieval) and/or VQA questions."""

    name: str = Field(min_length=1)
    captions: PathText | None = Field(None, description="COCO/Karpathy-style caption JSON")
    questions: PathText | None = Field(None, description="VQAv2-style questions JSON")
    annotations: PathText | None = Field(None, description="VQAv2-style annotations JSON")
    images: PathText | None = Field(None, description="image root directory")
    image_pattern: str | None = Field(None, description="VQA image file pattern under images")
    scenes: PathText | None = Field(None, description="world scenes JSON: retrieval counts a caption of an identical scene as right")
    limit: int | None = Field(None, ge=1, description="evaluate at most this many images / questions")
    tasks: list[Literal["caption", "vqa", "retrieval"]] = Field(default_factory=lambda: ["caption", "vqa", "retrieval"],
                                                               description="subset of caption, vqa, retrieval")
    retrieval_limit: int | None = Field(None, ge=2, description="retrieve among at most this many images (default: limit); ITM re-ranking costs k forward passes per query")
    retrieval_k: int = Field(16, ge=1, description="ITM re-ranks each query's top k ITC candidates (BLIP-2 on COCO: 128)")
    retrieval_captions: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1, description=(
        "retrieve only these captions of each image, by position from 0, each once (e.g. [0]: the world's "
        "'scene' caption, true of its scene alone); default: all"))
    lmms_eval: LmmsEvalSpec | None = Field(None, description=(
        "lmms-eval tasks every run is scored on by lmms-eval's own evaluator (needs the lmms-eval extra): "
        "tasks, include_path (local task YAMLs), limit, prompt"))

    @field_validator("name")
    @classmethod
    def _file_name(cls, value: str) -> str:
        """The name is also part of the file names its scores are kept in (retrieval-NAME-....json)."""
        return plain_file_name(value, "files of this split's stored scores", "test")

    @field_validator("retrieval_captions")
    @classmethod
    def _each_position_once(cls, value: list[int] | None) -> list[int] | None:
        """A position given twice would retrieve its caption twice and count it twice in the recall."""
        return listed_once(value, "caption position")

    @model_validator(mode="after")
    def _check_tasks(self) -> "EvalSet":
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks: each task once, got {self.tasks}")
        if not self.tasks and self.lmms_eval is None:
            raise ValueError("tasks: empty and no lmms_eval: this split would score nothing; give caption, vqa and/or retrieval")
        return self

    def evaluated_files(self) -> list[str]:
        """The files this split's scores depend on: a changed one re-scores the runs."""
        files = [self.captions, self.questions, self.annotations, self.scenes]
        return [f for f in files if f] + (self.lmms_eval.local_files() if self.lmms_eval else [])


MAX_JOBS = 64  # worker processes at most (`jobs`)


class CompareConfig(Strict):
    """N assemblies, one dataset, one budget and seed policy."""

    name: str = "comparison"
    runs: list[RunSpec] = Field(min_length=1)
    stage1_data: dict[str, Any] | None = Field(None, description="DataConfig for stage 1 (captions)")
    stage2_data: dict[str, Any] | None = Field(None, description="DataConfig for stage 2 (captions, QA texts); needed by every run that trains without its own")
    evals: list[EvalSet] = Field(default_factory=list)
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(default_factory=lambda: [0], min_length=1,
                                                     description="every run is repeated per seed; tables give mean and spread")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    stage1_objective: dict[str, Any] = Field(default_factory=dict, description="stage-1 objective options (e.g. max_text_tokens)")
    stage2_objective: dict[str, Any] = Field(default_factory=dict, description="stage-2 objective options")
    features: bool = Field(True, description="train from a frozen-feature cache (encoders are frozen; no augmentation then)")
    caption_prompt: str = Field("", description="prompt before generated captions (match how stage 2 was trained)")
    vqa_prompt: str = Field("Question: {} Short answer:", description="VQA prompt template")
    generation: dict[str, Any] = Field(default_factory=lambda: {"num_beams": 1, "max_new_tokens": 12},
                                       description="decoding settings (GenerationOptions) for captions, and for VQA but its length")
    vqa_max_new_tokens: int = Field(5, ge=1, description="most tokens of a VQA answer (short answers: BLIP-2's evaluation uses 10)")
    output_dir: PathText = Field(min_length=1)
    device: str = "auto"
    threads: int | None = Field(None, ge=1, description=(
        "torch CPU threads for the whole comparison (null: torch's default); small models on a busy machine often run "
        "several times faster with 1, as idle threads spin waiting for a core"))
    jobs: int = Field(1, ge=1, le=MAX_JOBS, description=(
        "worker processes training and evaluating runs side by side, each with `threads` threads (runs that share a "
        "stage 1 go to the same worker); results do not depend on it"))

    @field_validator("stage1_data", "stage2_data")
    @classmethod
    def _data(cls, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        return checked_data(value, str(info.field_name))

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"each seed once (a repeated seed trains the same run twice), got {seeds}")
        return seeds

    @model_validator(mode="after")
    def _check(self) -> "CompareConfig":
        if not self.evals:
            raise ValueError("evals: none given, so no run would be scored and there would be nothing to compare; give at least "
                             "one split, e.g. evals: [{name: val, captions: captions_val.json, images: images, tasks: [caption]}]")
        names = [r.name for r in self.runs]
        if len(set(names)) != len(names):
            raise ValueError(f"run names must be unique, got {names}")
        splits = [e.name for e in self.evals]
        if len(set(splits)) != len(splits):  # results are kept per split name: a second one would replace the first
            raise ValueError(f"evals: each split needs a name of its own (its scores are kept under it), got {splits}")
        if any(r.stage1_steps for r in self.runs) and self.stage1_data is None:
            raise ValueError("a run has stage1_steps but stage1_data is not given")
        untrained = [r.name for r in self.runs if r.checkpoint is None and r.stage2_data is None]
        if untrained and self.stage2_data is None:
            raise ValueError(f"runs {untrained} train a stage 2 but neither they nor the comparison give stage2_data")
        problem = template_problem(self.vqa_prompt, "vqa_prompt")
        if problem:
            raise ValueError(problem)
        return self

    def stage2_data_of(self, run: RunSpec) -> dict[str, Any] | None:
        """The data a run's stage 2 trains on: its own, else the comparison's."""
        return run.stage2_data if run.stage2_data is not None else self.stage2_data

    def groups(self) -> list[str]:
        """The report's tables, in the order their first run appears."""
        return list(dict.fromkeys(r.group for r in self.runs))
