"""Sample data, configs and small objectives for the trainer tests (no tests here).

The images are solid colours and each caption names its colour: there is something to learn, and a
random crop or flip of a solid image is the same image, so runs in 1 or 2 processes see equal pixels.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20), "yellow": (230, 230, 20)}


UNEVEN_TAILS = ["", " on a table", " next to a small round blue ball", " in the corner of a big empty room with two windows"]


def write_caption_data(root: Path, images: int = 16, uneven: bool = False) -> Path:
    """root/images/{i}.png (16 x 16 px, solid) with train.jsonl and val.jsonl naming each colour;
    `uneven` gives the captions lengths from 3 to 14 words (ranks then hold unequal token counts)."""
    names = list(COLOURS)
    rows = []
    for i in range(images):
        name = names[i % len(names)]
        path = root / "images" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), COLOURS[name]).save(path)
        tail = UNEVEN_TAILS[(i * 3 // len(names)) % len(UNEVEN_TAILS)] if uneven else ""
        rows.append({"image": f"images/{i}.png", "text": f"a {name} square{tail}", "image_id": i})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[: len(names)]), encoding="utf-8")
    return root


def config(data: Path, output_dir: Path, *, with_eval: bool = False, **overrides: Any) -> dict[str, Any]:
    """A small stage-1 config on `data` (with val.jsonl as eval data if asked); keyword arguments
    replace top-level keys."""
    sets = {"train": {"format": "jsonl", "paths": [str(data / "train.jsonl")], "num_workers": 0}}
    if with_eval:
        sets["eval"] = {"format": "jsonl", "paths": [str(data / "val.jsonl")], "num_workers": 0}
    base: dict[str, Any] = {
        "assembly": "tiny-qformer-opt",
        "stage": 1,
        "data": sets,
        "batch_size": 4,
        "steps": 8,
        "optimizer": {"lr": 1e-3},
        "schedule": {"warmup_steps": 2},
        "log_every": 2,
        "output_dir": str(output_dir),
        "tensorboard": False,
    }
    base.update(overrides)
    return base


def write_config(path: Path, values: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(values), sort_keys=False), encoding="utf-8")
    return path


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def train_losses(output_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(output_dir) if "loss" in m]


def as_old_trainer_state(step_dir: Path, **changes: Any) -> Path:
    """Turn a step's trainer_state.safetensors into the trainer_state.pt an older vlbridge wrote
    (torch.save of the same dict), with `changes` to its top-level keys."""
    from vlbridge.train import checkpointing

    state = checkpointing.load_trainer_state(step_dir)
    (step_dir / checkpointing.TRAINER_STATE).unlink()
    path = step_dir / checkpointing.OLD_TRAINER_STATE
    torch.save({**state, **changes}, path)
    return path


def subprocess_env() -> dict[str, str]:
    """One thread and MKL's strict reproducibility mode: runs in separate processes then compute
    bit-identical numbers (MKL's results otherwise depend on memory alignment)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MKL_CBWR="AUTO,STRICT", VLBRIDGE_LOAD_PLUGINS="")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def mse_objective(model: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A deterministic stand-in objective: pull the visual tokens towards zero."""
    loss = model.visual_tokens(batch["pixel_values"]).float().pow(2).mean()
    return {"loss": loss, "mse": loss.detach()}


class Recording:
    """Wraps an objective: returns a NaN loss on the listed calls (0-based) and records, at each
    call, the first trainable tensor and whether any gradient was left over from before."""

    def __init__(self, objective: Any = mse_objective, nan_calls: set[int] | frozenset[int] = frozenset()):
        self.objective, self.nan_calls = objective, set(nan_calls)
        self.calls, self.weights, self.leftover_grads = 0, [], []

    def __call__(self, model: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if model.training:
            params = model.trainable_parameters()
            self.weights.append(params[0].detach().clone())
            self.leftover_grads.append(any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params))
        losses = self.objective(model, batch)
        if model.training and self.calls in self.nan_calls:
            losses = {name: value * float("nan") for name, value in losses.items()}
        self.calls += model.training
        return losses


def hardest_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, image_ids: torch.Tensor,
                      all_image_ids: torch.Tensor | None = None, generator: Any = None, positives: Any = None) -> Any:
    """ITM negatives without sampling (the most similar non-positive), for runs that must agree exactly."""
    from vlbridge.train import losses

    if all_image_ids is None:
        all_image_ids = losses.all_gather_no_grad(image_ids)
    if positives is None:
        positives = losses.image_positives(image_ids, all_image_ids)
    image_w, has_image = losses.negative_weights(sim_t2i, positives.t2i)
    text_w, has_text = losses.negative_weights(sim_i2t, positives.i2t)
    images, texts = image_w.argmax(dim=1), text_w.argmax(dim=1)
    return losses.HardNegatives(images.masked_fill(~has_image, -1), texts.masked_fill(~has_text, -1), has_image, has_text)


def deterministic_stage1(model: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The real Stage1Objective with dropout off (use inside `exact_stage1`)."""
    from vlbridge.train import objectives

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attn_dropout"):  # the Q-Former's attention-probability dropout
            module.attn_dropout = 0.0
    return objectives.Stage1Objective()(model, batch)


@contextlib.contextmanager
def recording_gradients(grads_dir: Path) -> Iterator[None]:
    """Each optimizer step saves the gradients it applies (after DDP's all-reduce) to
    grads_dir/rank{R}-step{N}.pt."""
    from vlbridge.train import distributed

    adamw_step, steps = torch.optim.AdamW.step, [0]

    def recording_step(optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        grads = [p.grad.clone() for group in optimizer.param_groups for p in group["params"]]
        steps[0] += 1
        torch.save(grads, Path(grads_dir) / f"rank{distributed.rank()}-step{steps[0]}.pt")
        return adamw_step(optimizer, *args, **kwargs)

    torch.optim.AdamW.step = recording_step
    try:
        yield
    finally:
        torch.optim.AdamW.step = adamw_step


@contextlib.contextmanager
def exact_stage1(grads_dir: Path) -> Iterator[None]:
    """Make stage 1 computable alike in 1 and N processes, and record each step's gradients.

    ITM takes the hardest negative instead of sampling one. ITC gathers the other ranks' features
    with their gradient: BLIP-2 gathers them without (each rank's loss trains its own features
    only), so its DDP gradient is by design not a single process's. Gradients are recorded as
    `recording_gradients` does.
    """
    from vlbridge.train import distributed, losses, objectives

    saved = (objectives.sample_hard_negatives, losses.all_gather_no_grad)
    no_grad_gather = saved[1]

    def gather(tensor: torch.Tensor, keep_local: bool = False) -> torch.Tensor:
        return distributed.all_gather_with_grad(tensor) if keep_local else no_grad_gather(tensor)

    objectives.sample_hard_negatives, losses.all_gather_no_grad = hardest_negatives, gather
    try:
        with recording_gradients(grads_dir):
            yield
    finally:
        objectives.sample_hard_negatives, losses.all_gather_no_grad = saved


def train_recording(config_source: Mapping[str, Any] | str, grads: Path, **options: Any) -> Any:
    """Train one config (`options` go to vlbridge.train.run), saving the gradients each step applies
    into `grads`: stage 1 under `exact_stage1`, stage 2 with the config's own objective."""
    import vlbridge.train
    from vlbridge.train.config import read_config

    if read_config(config_source)[0].stage == 1:
        with exact_stage1(Path(grads)):
            return vlbridge.train.run(config_source, objective=deterministic_stage1, **options)
    with recording_gradients(Path(grads)):
        return vlbridge.train.run(config_source, **options)


@contextlib.contextmanager
def one_process_group() -> Iterator[int]:
    """A worker that trains several configs joins the process group once and yields its rank: the
    trainer uses an open group and leaves it open, and each launch costs seconds of start-up."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        yield dist.get_rank()
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    """`python -m tests.test_trainer_samples CONFIG.yaml GRADS_DIR [CONFIG GRADS_DIR ...]` (one rank of
    the DDP tests): train each config in turn with `train_recording`."""
    with one_process_group():
        for config_path, grads in zip(argv[::2], argv[1::2]):
            train_recording(config_path, Path(grads))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
