"""The settings of the lmms-eval wrapper and of a compare config's lmms-eval block (no torch, no
lmms-eval: a config is checked before anything heavy loads)."""

from __future__ import annotations

from pathlib import Path

from pydantic import ConfigDict, Field, field_validator, model_validator

from vlbridge.modeling.prompts import template_problem
from vlbridge.parts.devices import device_syntax_problem
from vlbridge.files.config_fields import StrictNumbers

PROMPT_HELP = ("how the task's text reaches the LLM: '{}' is the text as the task wrote it; BLIP-2's VQA prompt is "
               "'Question: {} Short answer:'. The LLM's own template (e.g. a chat format) is applied after it")
DTYPES = ("auto", "fp32", "bf16", "fp16")


class Strict(StrictNumbers):
    model_config = ConfigDict(extra="forbid")


class PromptSettings(Strict):
    """What every use of the wrapper shares: the prompt, batching and the default answer length."""

    prompt: str = Field("{}", description=PROMPT_HELP)
    batch_size: int = Field(8, ge=1, description="requests per forward pass")
    max_new_tokens: int = Field(32, ge=1, description="answer length when the task's generation_kwargs give none")

    @field_validator("prompt")
    @classmethod
    def _one_slot(cls, prompt: str) -> str:
        problem = template_problem(prompt, "prompt")
        if problem:
            raise ValueError(problem)
        return prompt


class WrapperOptions(PromptSettings):
    """`--model_args` of `--model vlbridge`: which model, where it runs, how prompts are written."""

    checkpoint: str | None = Field(None, description="a vlbridge checkpoint directory (model.save, vlbridge import, a run's output_dir)")
    assembly: str | None = Field(None, description="a preset name or assembly YAML, built as it is (random connector unless weights)")
    weights: str | None = Field(None, description="connector weights for `assembly` (a checkpoint directory or safetensors file)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps; under accelerate/torchrun: cuda -> cuda:LOCAL_RANK")
    dtype: str = Field("auto", description="autocast of the forward passes: auto (the assembly's own dtypes), fp32, bf16 or fp16")
    random_weights: bool = Field(False, description="allow real-size frozen parts without pretrained weights (random on purpose)")

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        problem = device_syntax_problem(device)
        if problem:
            raise ValueError(problem)
        return device

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, dtype: str) -> str:
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        return dtype

    @model_validator(mode="after")
    def _one_source(self) -> "WrapperOptions":
        if (self.checkpoint is None) == (self.assembly is None):
            raise ValueError("give the model as checkpoint=DIR or as assembly=PRESET_OR_YAML (exactly one of them), "
                             "e.g. --model_args checkpoint=runs/stage2")
        if self.weights is not None and self.assembly is None:
            raise ValueError("weights= goes with assembly=; a checkpoint directory carries its own weights")
        return self


class LmmsEvalSpec(PromptSettings):
    """A compare config's lmms-eval block: tasks every run is scored on, by lmms-eval's own evaluator."""

    tasks: list[str] = Field(min_length=1, description="lmms-eval task names (its own, or local ones under include_path)")
    include_path: str | None = Field(None, description="a folder of local task YAMLs (and their data), as lmms-eval's --include_path")
    include_defaults: bool = Field(True, description=(
        "also index lmms-eval's own tasks (false: only include_path's, which loads in a fraction of the time)"))
    limit: int | None = Field(None, ge=1, description="score at most this many documents per task")

    @model_validator(mode="after")
    def _where_tasks_come_from(self) -> "LmmsEvalSpec":
        if not self.include_defaults and self.include_path is None:
            raise ValueError("include_defaults: false leaves no task to run; give include_path (a folder of task YAMLs) "
                             "or set include_defaults: true")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks are listed twice: {self.tasks}")
        return self

    def local_files(self) -> list[str]:
        """Every file under include_path (task YAMLs, helpers, data): what a local task's scores depend on."""
        if self.include_path is None:
            return []
        return sorted(str(path) for path in Path(self.include_path).rglob("*") if path.is_file())
