"""vlbridge.train: what training needs beyond the model.

Submodules: `losses` (BLIP-2's stage-1 losses and the prefix-LM split, pure tensor functions),
`distributed` (gathers that also work in a single process), `objectives` (what the trainer calls:
`objective(model, batch) -> {"loss": ..., component: ...}` for stage 1 and stage 2).
The trainer: `run(config)` (also `vlbridge train CONFIG.yaml`), built from `config` (the YAML
schema), `optim`, `inputs`, `runtime` (devices, DDP), `checkpointing` and `progress` (bar, metrics);
`finetune_config` (the torch-free `finetune:` section) and `finetune` (applying it: an unfrozen
encoder, LoRA on the LLM).

This package's own import stays torch-free; import the submodules that need torch explicitly.
"""

from typing import Any

__all__ = ["run"]


def __getattr__(name: str) -> Any:
    if name == "run":  # the trainer imports torch: load it on first use
        from vlbridge.train.trainer import run

        return run
    raise AttributeError(f"module 'vlbridge.train' has no attribute {name!r}")
