"""The training loop: `vlbridge.train.run(config)` and `vlbridge train CONFIG.yaml [--resume]`.

It reads top to bottom as a run does: set up (model, objective, optimizer, schedule, data), resume
if asked, then repeat step -> log -> evaluate -> checkpoint until the last step. One optimizer step
is `grad_accum` forward/backward passes; a non-finite loss on any rank skips the whole step.

An objective whose losses are means over items (stage 2's target tokens or samples; it says so
with a `loss_items` count) is weighed by those counts across micro-batches and ranks: the loss is
the sum over the whole global batch divided by its item count (all-reduced), as transformers'
Trainer does with `average_tokens_across_devices`, so N processes or N accumulation steps train
exactly as one batch would. Other objectives (stage 1) average the micro-batch means.

A resumed run continues bit for bit (weights, metrics) when the data is read in the main process
(num_workers: 0) on the same hardware, thread count and number of processes: the checkpoint holds
every generator state and each rank's data position. Evaluation runs on a forked RNG, so it does
not move the training run's random stream.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from vlbridge.assemblies.assembly import Assembly
from vlbridge.assemblies.saved import checkpoint_config
from vlbridge.data.batching import DataProgress
from vlbridge.data.build import make_loader
from vlbridge.errors import VLBridgeError
from vlbridge.files.checkpoint import read_meta
from vlbridge.files.checkpoint_paths import only_unpointed_checkpoint, unpointed_checkpoints
from vlbridge.finetune.tuning import restore_tuned, tuned_parts
from vlbridge.modeling.connector_protocol import connector_state
from vlbridge.modeling.factory import load_connector_weights
from vlbridge.train import checkpointing as ckpt
from vlbridge.train import distributed
from vlbridge.train import fsdp
from vlbridge.train import runtime as rt
from vlbridge.files.checkpoint_source import resolve_checkpoint
from vlbridge.train.config import TrainConfig, check_config, dump_config, read_config
from vlbridge.train.finetune import describe_trainable, trainable_counts
from vlbridge.train.finetune_config import FinetuneConfig
from vlbridge.train.inputs import BatchStream, batch_length, build_dataset_for, evaluation_batches, to_device
from vlbridge.train.memory_plan import plan_for_config
from vlbridge.train.objectives import LOSS_ITEMS
from vlbridge.train.optim import WarmupCosine, build_optimizer, load_optimizer_state
from vlbridge.train.progress import MetricsLog, ProgressBar, Silent, StepReporter
from vlbridge.train.run_setup import (Objective, build_model, default_objective, other_llm_note, refuse_existing_run,
                                      setting_differences)
from vlbridge.train.text_cuts import SETTING as TEXT_SETTING, TextCuts

RESUME_MUST_MATCH = ("assembly", "stage", "finetune")  # another model, stage or recipe cannot continue a checkpoint


class NonFiniteLossError(VLBridgeError):
    """Too many non-finite losses in a row: the run stops instead of burning compute."""


@dataclass
class TrainResult:
    """How a run ended: its last step, checkpoint and logged metrics."""

    step: int
    checkpoint: Path | None
    train: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] | None = None
    nonfinite: int = 0
    data: str = ""  # what the data loader read and skipped (DataProgress.summary)
    texts: str = ""  # training texts the objective cut at max_text_tokens, over the whole run ('' when none: TextCuts.summary)


def run(config: TrainConfig | Mapping[str, Any] | str | Path, *, resume: bool = False, objective: Objective | None = None,
        quiet: bool = False, tell_cuts: bool = True, on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train as the config says. `resume` continues from output_dir's latest checkpoint (or starts
    when there is none); `objective` replaces the stage's default (Stage1Objective / Stage2Objective);
    `quiet` prints no plan, header or progress lines (for a caller with its own progress line, such as
    `vlbridge compare`); warnings (skipped non-finite steps, changed resume settings) still print.
    `tell_cuts` False: no warning about texts cut at max_text_tokens, for a caller that reports
    TrainResult.texts itself (compare's report). `on_step`, in a quiet run, is told each step reached
    (rank 0), so that such a caller's progress line can time the steps."""
    config, label = read_config(dict(config) if isinstance(config, Mapping) else config)
    return train(config, check_config(config, label), resume=resume, objective=objective, quiet=quiet, tell_cuts=tell_cuts,
                 on_step=on_step)


def train(config: TrainConfig, assembly: Assembly, *, resume: bool = False, objective: Objective | None = None,
          quiet: bool = False, tell_cuts: bool = True, on_step: Callable[[int], None] | None = None) -> TrainResult:
    """`run` for a config already validated by `check_config` (which returned `assembly`)."""
    output_dir = Path(config.output_dir).expanduser()
    with rt.runtime(config.device) as where, ckpt.exclusive(output_dir, hold=where.main):
        if not resume:
            refuse_existing_run(output_dir)  # before any weight loads
        trainer = Trainer(config, assembly, where, objective, quiet=quiet, tell_cuts=tell_cuts)
        if quiet and on_step is not None and where.main:
            trainer.bar = StepReporter(on_step)
        try:
            return trainer.fit(resume)
        finally:
            trainer.close()


class Trainer:
    """One run's state: built in __init__, driven by `fit`."""

    def __init__(self, config: TrainConfig, assembly: Assembly, where: rt.Runtime, objective: Objective | None = None,
                 quiet: bool = False, tell_cuts: bool = True):
        self.config, self.where, self.device, self.quiet = config, where, where.device, quiet
        self.tell_cuts = tell_cuts
        self.output_dir = Path(config.output_dir).expanduser()
        rt.seed_everything(config.seed)  # the same initial weights on every rank
        self.model, self.recipe = build_model(config, assembly, self.device)
        note = other_llm_note(config, assembly)
        if note:
            self.say(note)
        rt.seed_everything(config.seed + where.rank)  # augmentation, dropout and negatives differ per rank
        self.objective = objective or default_objective(config, self.model)
        self.optimizer = build_optimizer(self.model, config.optimizer, self.recipe.lr_groups)
        self.train_set = build_dataset_for(config.data.train, self.model, train=True, features=config.data.features, where="data.train")
        self.eval_set = None if config.data.eval is None else build_dataset_for(
            config.data.eval, self.model, train=False, features=config.data.features, where="data.eval")
        self.progress = DataProgress(epoch=0)
        self.total_steps = self._total_steps()
        self.scheduler = WarmupCosine(self.optimizer, lr=config.optimizer.lr, total_steps=self.total_steps, schedule=config.schedule)
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        self.step, self.nonfinite, self.nonfinite_in_row, self.skipped_before = 0, 0, 0, 0
        self.untaught_in_row = 0  # steps in a row whose whole batch kept no target token
        self.last_train: dict[str, Any] = {}
        self.last_eval: dict[str, Any] | None = None
        self.cuts_told: set[str] = set()  # "train", "eval": cut texts were reported (once per run each)
        self.bar: Any = Silent()
        self.metrics: Any = MetricsLog(self.output_dir, config.tensorboard) if where.main else Silent()

    # -- the run ----------------------------------------------------------------------------------
    def fit(self, resume: bool) -> TrainResult:
        rng_state = self.restore() if resume else self.start()
        self.batches = BatchStream(self.train_set, self.config.batch_size, seed=self.config.seed, rank=self.where.rank,
                                   world_size=self.where.world_size, num_workers=self.config.data.train.num_workers,
                                   drop_last=self.config.drop_last, progress=self.progress)
        if self.step == 0:  # a fresh run (a resumed one has its checkpoint's weights)
            self.start_objective()
        try:
            return self.run_steps(rng_state)
        finally:
            self.batches.close()  # the loader's workers stop now, on success or error, not at a later garbage collection

    def run_steps(self, rng_state: dict[str, Any] | None) -> TrainResult:
        """The loop of `fit`, once the model state and the batch stream are in place."""
        self.sharded = fsdp.apply_parallel(self.model, self.config.parallel, stage=self.config.stage,
                                           precision=self.config.precision, world_size=self.where.world_size)
        if self.config.parallel.strategy == "fsdp" and self.where.world_size == 1:  # runs, but holds what the config meant to split
            self.say("note: parallel.strategy fsdp in one process shards nothing: the whole model is on this device; launch "
                     "with torchrun --nproc_per_node N to split the frozen parts over N processes")
        self.objective_step = rt.wrap(self.model, self.objective, self.where, self.config.find_unused_parameters,
                                      ddp=self.sharded is None)
        self.model.train()
        if rng_state is not None:
            ckpt.restore_rng(rng_state)  # last: nothing above may draw from the restored generators
        self.announce()
        if self.step > self.total_steps:  # steps (or epochs) lowered below where the run stands: nothing is trained
            self.say(f"note: the checkpoint is at step {self.step}, past the {self.total_steps} steps this config trains; nothing "
                     f"is trained (raise steps or epochs above {self.step} to train on)")
        self.window = Window()
        while self.step < self.total_steps:
            self.train_step()
            self.step += 1
            self.bar.update(self.step)
            if self.step % self.config.log_every == 0 or self.step == self.total_steps:
                self.log()
            # the last step evaluates before its checkpoint, as every step does: a run killed once step-N is
            # saved resumes past the evaluation, so one made after the save would be lost
            last = self.step == self.total_steps
            if last or (self.config.eval_every and self.step % self.config.eval_every == 0):
                self.evaluate()
            if last or (self.config.save_every and self.step % self.config.save_every == 0):
                self.save()
        final = ckpt.checkpoint_dir(self.output_dir, self.step)
        cut = self.cut_texts("train")
        return TrainResult(self.step, final, self.last_train, self.last_eval, self.nonfinite, self.progress.summary(),
                           cut.summary("training texts") if cut is not None else "")

    def train_step(self) -> None:
        """One optimizer step over grad_accum micro-batches, or a skipped one if any loss is non-finite."""
        accum = self.config.grad_accum
        finite = torch.ones((), device=self.device)
        sums: dict[str, torch.Tensor] = {}
        items: torch.Tensor | None = None  # the step's item count on this rank, for objectives that give one
        trained = False
        for i in range(accum):
            batch = next(self.batches)
            if not self.usable(batch):
                continue
            trained = True
            self.window.images += batch_length(batch)
            with rt.no_sync(self.objective_step, sync=i == accum - 1), rt.autocast(self.device, self.config.precision):
                losses = dict(self.objective_step(to_device(batch, self.device)))
            weight = losses.pop(LOSS_ITEMS, None)
            loss = losses["loss"].float()
            finite = finite * torch.isfinite(loss.detach())
            if weight is None:
                weight = torch.tensor(1.0 / accum, device=self.device)  # the mean of the micro-batch means
            else:
                items = weight if items is None else items + weight  # sums now; divided by the global count below
            self.backward(loss * weight)
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() * weight
        if not trained:
            raise VLBridgeError(f"step {self.step + 1}: every sample drawn for it was skipped ({self.progress.summary()}), so it "
                                "would train on nothing and the run would end with an untrained checkpoint; fix or remove those "
                                "samples (data.strict: true stops at the first), or raise batch_size")
        if self.sharded is not None:
            fsdp.average_gradients(self.model.trainable_parameters())  # what DDP's all-reduce does
        taught = True
        if items is not None:
            sums, taught = self.mean_over_global_items(items, sums)
        if not taught:
            self.skip_untaught_step()
        elif rt.all_finite(finite):
            self.optimizer_step()
            self.window.add(sums)
            self.nonfinite_in_row = self.untaught_in_row = 0
        else:
            self.skip_step(sums)
        self.scheduler.step()

    def mean_over_global_items(self, items: torch.Tensor, sums: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
        """Turn the step's item-weighted sums into means over every rank's items: the gradients (which
        DDP averaged over the ranks) are scaled by world_size / N, and the logged losses become the
        global means (the same on every rank). Also whether there was any item (N > 0)."""
        totals = rt.sum_tensor_over_ranks(torch.stack([items.float(), *(value.float() for value in sums.values())]))
        count = totals[0].clamp_min(1.0)
        scale = self.where.world_size / count
        for param in self.model.trainable_parameters():
            if param.grad is not None:
                param.grad.mul_(scale)
        return {name: total / count for name, total in zip(sums, totals[1:])}, bool(totals[0] > 0)

    def usable(self, batch: Mapping[str, Any]) -> bool:
        """A batch whose every sample was skipped trains nothing; under DDP that would stall the others."""
        if batch_length(batch) > 0:
            return True
        if self.where.world_size > 1:
            raise VLBridgeError(f"rank {self.where.rank} drew a batch whose every sample was skipped ({self.progress.summary()}); "
                                "under DDP every rank must train each step: remove the broken samples or raise batch_size")
        return False

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def optimizer_step(self) -> None:
        """Unscale (fp16), clip, step, zero the gradients."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.grad_clip is not None:
            self.window.grad_norm = float(nn.utils.clip_grad_norm_(self.model.trainable_parameters(), self.config.grad_clip))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip_step(self, sums: Mapping[str, torch.Tensor]) -> None:
        """Drop the gradients of a non-finite step, count it, and stop after max_nonfinite in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite += 1
        self.nonfinite_in_row += 1
        parts = ", ".join(f"{name} {float(value):.4g}" for name, value in sums.items())
        limit = self.config.max_nonfinite
        self.warn(f"step {self.step + 1}: non-finite loss ({parts}); step skipped ({self.nonfinite_in_row}/{limit} in a row)")
        if self.nonfinite_in_row >= limit:
            latest = ckpt.latest_checkpoint(self.output_dir)
            raise NonFiniteLossError(
                f"stopped at step {self.step + 1}: {self.nonfinite_in_row} non-finite losses in a row (max_nonfinite: {limit}). "
                f"Last checkpoint: {latest or 'none'}. Lower optimizer.lr, set grad_clip, or use bf16 instead of fp16.")

    def skip_untaught_step(self) -> None:
        """A step whose whole global batch has no item to learn (no target token on any rank) updates
        nothing: AdamW would still move the weights on its momentum and decay, driven by no data. Data
        whose every text is like that would end the run untrained, so max_nonfinite such steps in a row stop it."""
        self.optimizer.zero_grad(set_to_none=True)
        self.untaught_in_row += 1
        limit = self.config.max_nonfinite
        self.warn(f"step {self.step + 1}: no text of the whole batch kept a target token (each one's input filled "
                  f"{TEXT_SETTING}); step skipped ({self.untaught_in_row}/{limit} in a row)")
        if self.untaught_in_row >= limit:
            latest = ckpt.latest_checkpoint(self.output_dir)
            raise VLBridgeError(
                f"stopped at step {self.step + 1}: {self.untaught_in_row} steps in a row had no target token in their whole "
                f"batch (max_nonfinite: {limit}), so the run was training on nothing: the texts' inputs (prompt, instruction) "
                f"fill {TEXT_SETTING}. Raise it or shorten the inputs. Last checkpoint: {latest or 'none'}.")

    # -- reporting --------------------------------------------------------------------------------
    def warn(self, message: str) -> None:
        """A line the user must see: above the progress bar, or on stderr in a quiet run (rank 0 only)."""
        if self.quiet:
            self.say(message)
        else:
            self.bar.write(message)

    def counted_texts(self, phase: str) -> TextCuts | None:
        """This rank's count of the texts the objective cut at max_text_tokens while training or
        evaluating (`phase` "train" or "eval"); None for an objective that counts none (a custom one)."""
        counted = getattr(self.objective, "text_cuts", None)
        return counted.get(phase) if isinstance(counted, Mapping) else None

    def cut_texts(self, phase: str) -> TextCuts | None:
        """`counted_texts` summed over the ranks (a collective: every rank calls it)."""
        mine = self.counted_texts(phase)
        return None if mine is None else mine.with_counts(rt.sum_over_ranks(mine.counts()))

    def tell_cut_texts(self, phase: str, what: str) -> None:
        """Warn, once per run for each phase, when the objective cut texts so far (not where the caller
        reports TrainResult.texts itself: `tell_cuts` False, as compare's report does)."""
        if phase in self.cuts_told or not self.tell_cuts:
            return
        cut = self.cut_texts(phase)
        if cut is not None and cut.summary():
            self.cuts_told.add(phase)  # the same sums, so the same decision, on every rank
            self.warn(cut.warning(what, so_far=phase == "train"))

    def log(self) -> None:
        """One metrics line (averaged over the steps since the last one and over the ranks)."""
        totals = rt.sum_over_ranks(self.window.totals(self.progress.skipped_count + self.skipped_before))
        steps = totals.pop("steps")
        record: dict[str, Any] = {"step": self.step, "epoch": self.progress.epoch}
        record.update({name: value / max(steps, 1)
                       for name, value in totals.items() if name not in ("images", "skipped", "grad_norm")})
        record["lr"] = self.scheduler.lr_at(self.step - 1)
        if self.window.grad_norm is not None:
            record["grad_norm"] = self.window.grad_norm
        record.update(images_per_s=totals["images"] / self.window.elapsed(), skipped=int(totals["skipped"]), nonfinite=self.nonfinite)
        self.metrics.append(record)
        self.bar.update(self.step, loss=record.get("loss", float("nan")), lr=record["lr"], img_s=record["images_per_s"])
        self.bar.show()
        self.last_train, self.window = record, Window()
        self.tell_cut_texts("train", "training texts")

    def evaluate(self) -> None:
        """Mean validation loss over every rank's share (per item where the objective counts items,
        else per sample), each sample counted once (the repeats that even out the ranks' shares are
        left out), logged; RNG and mode restored."""
        if self.eval_set is None:
            return
        self.model.eval()
        sums: dict[str, float] = {"samples": 0.0}
        cuts = self.counted_texts("eval")
        if cuts is not None:
            cuts.reset()  # this evaluation's texts only
        loader = make_loader(self.eval_set, self.config.batch_size, seed=self.config.seed, rank=self.where.rank,
                             world_size=self.where.world_size, num_workers=self.config.data.eval.num_workers)
        with torch.no_grad(), rt.isolated_rng(self.device), rt.autocast(self.device, self.config.precision):
            for batch, counts in evaluation_batches(loader, self.where.world_size):
                if cuts is not None:
                    cuts.counting = counts  # a repeat's texts count where they are read for real
                losses = dict(self.objective(self.model, to_device(batch, self.device)))
                if not counts:  # a repeat that only keeps this rank in step with the others' collectives
                    continue
                n = float(losses.pop(LOSS_ITEMS, batch_length(batch)))
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + float(value) * n
                sums["samples"] += n
        self.model.train()
        self.tell_cut_texts("eval", "validation texts")
        totals = rt.sum_over_ranks(sums)
        samples = totals.pop("samples")
        if samples == 0:  # 0 / 0: a mean over nothing, not a loss of 0
            self.warn(f"step {self.step}: the validation data gave no item to score (no text kept a target token within "
                      f"{TEXT_SETTING}); no eval_loss logged")
            return
        record = {"step": self.step, "epoch": self.progress.epoch, **{f"eval_{k}": v / samples for k, v in totals.items()}}
        self.metrics.append(record, prefix="eval")
        self.bar.write(f"step {self.step}: " + " ".join(f"{k} {v:.4g}" for k, v in record.items() if k.startswith("eval_")))
        self.last_eval = record

    def announce(self) -> None:
        if not self.where.main or self.quiet:  # the bar stays Silent
            return
        self.bar = ProgressBar(self.total_steps, start=self.step)
        c, plan = self.config, self.model.plan
        batch = c.batch_size * c.grad_accum * self.where.world_size
        if self.step > 0:
            start = f"as saved at step {self.step}"  # resumed: the checkpoint's weights, whatever the run started from
        else:
            start = f"from {resolve_checkpoint(c.init_from, 'init_from').directory}" if c.init_from else "from scratch"
        self.bar.write(plan_for_config(c, plan, self.where.world_size, trainable_counts(self.model)).describe())  # what each rank was planned to hold
        self.bar.write(f"vlbridge train: {plan.name} stage {c.stage}, {describe_trainable(self.model, self.recipe.notes)}; "
                       f"{self.total_steps} steps of {batch} samples on {self.where.world_size} x {self.device} ({c.precision}) "
                       f"from step {self.step} -> {self.output_dir}; connector {start}")

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self) -> int:
        """Every rank hands in its RNG states and data position; rank 0 writes step-N and `latest`."""
        cuts = self.counted_texts("train")
        ranks = distributed.all_gather_object({"rng": ckpt.capture_rng(), "data": self.progress.state_dict(),
                                                  "skipped": self.progress.skipped_count + self.skipped_before,
                                                  "text_cuts": None if cuts is None else cuts.counts()})
        parts = tuned_parts(self.model)  # on every rank: gathering a sharded tensor is a collective
        if self.where.main:
            state = {"format": ckpt.STATE_FORMAT, "version": ckpt.STATE_VERSION, "step": self.step, "epoch": self.progress.epoch,
                     "world_size": self.where.world_size, "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                     "nonfinite": [self.nonfinite, self.nonfinite_in_row], "untaught_in_row": self.untaught_in_row,
                     "ranks": ranks, "cuts_told": sorted(self.cuts_told)}
            ckpt.save_training_checkpoint(
                self.output_dir, self.step, assembly=checkpoint_config(self.model.assembly),
                connector=connector_state(self.model.connector), stage=self.config.stage, trained_stages=self.model.trained_stages,
                trainer_state=state,
                config_yaml=dump_config(self.config), keep_last=self.config.keep_last, parts=parts)
        rt.barrier()
        return self.step

    def start_objective(self) -> None:
        """The objective's one-time set-up (`Objective.start`), on the run's first batch read once more
        from its own loader, so that the stream's order and position, and torch's RNG, are untouched.
        An objective that does not say it `starts` (any callable may be one) has nothing to set up."""
        start = getattr(self.objective, "start", None)
        if start is None or not getattr(self.objective, "starts", False):
            return
        # a loader draws its base seed from torch's RNG: forked, so the run's dropout draws stay as they were
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            loader = self.batches.loader(0)
            first = next(iter(loader), None)
            del loader
            if first is None or not self.usable(first):
                return
            training = self.model.training
            self.model.eval()  # measured without dropout
            try:
                line = start(self.model, to_device(first, self.device))
            finally:
                self.model.train(training)
        if line and not self.quiet:  # a quiet run's caller (the demo) keeps its own progress line
            self.say(line)

    def start(self) -> None:
        """A fresh run: output_dir gets the config it was started with."""
        if self.where.main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_text(self.output_dir / ckpt.CONFIG_FILE, dump_config(self.config))
            earlier = self.metrics.set_aside()
            if earlier is not None:
                self.say(f"{self.metrics.path} held an earlier run's lines (it saved no checkpoint to resume "
                         f"from); they are kept in {earlier.name}")

    def restore(self) -> dict[str, Any] | None:
        """Load the latest checkpoint into model, optimizer, schedule and counters; return this rank's RNG state."""
        latest = ckpt.latest_checkpoint(self.output_dir)
        if latest is None and (latest := only_unpointed_checkpoint(self.output_dir)) is not None:
            self.say(f"{latest.parent / ckpt.LATEST} is missing (the run stopped before writing it); resuming from the one "
                     f"complete checkpoint, {latest.name}")
        if latest is None and (problem := unpointed_checkpoints(self.output_dir)) is not None:
            raise VLBridgeError(problem)  # "no checkpoint yet", then a new run mixed with the earlier one's steps
        if latest is None:
            self.say(f"no checkpoint under {self.output_dir / ckpt.CHECKPOINTS} yet; starting at step 0")
            return self.start()
        with ckpt.readable(self.output_dir, latest):
            state = ckpt.load_trainer_state(latest)
            saved = ckpt.load_saved_config(latest)
        rt.require_single_or_same(int(state["world_size"]), self.where)
        self.compare_config(latest, saved)
        with ckpt.readable(self.output_dir, latest):
            load_connector_weights(self.model, latest)
            restore_tuned(self.model, latest, read_meta(latest))  # the trained encoder tensors and adapters, into the same parameters
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.nonfinite, self.nonfinite_in_row = (int(n) for n in state["nonfinite"])
        self.untaught_in_row = int(state.get("untaught_in_row", 0))  # absent from states written before the limit
        mine = state["ranks"][self.where.rank]
        self.progress, self.skipped_before = DataProgress.from_state(mine["data"]), int(mine["skipped"])
        cuts, saved_cuts = self.counted_texts("train"), mine.get("text_cuts")  # absent from states written before the count
        if cuts is not None and isinstance(saved_cuts, Mapping):
            cuts.resume_counts(saved_cuts)
        self.cuts_told = set(state.get("cuts_told", ()))  # warned before the resume: once per run, not per process
        self.metrics.truncate_after(self.step)
        self.say(f"resuming from {latest}")
        if self.config.data.train.num_workers > 0 and self.config.data.features is None:
            self.say("data.train.num_workers > 0: the sample order resumes exactly, but the random crops and flips drawn "
                     "in worker processes restart with the epoch's worker seeds (num_workers: 0 resumes bit for bit)")
        return mine["rng"]

    def compare_config(self, checkpoint: Path, saved: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model, stage or fine-tuning recipe (its config `saved`);
        warn about other changed settings."""
        saved.setdefault("finetune", FinetuneConfig().model_dump(mode="json"))  # written before fine-tuning recipes existed
        now = self.config.model_dump(mode="json")
        changed = [key for key in now if saved.get(key) != now[key]]
        fatal = [key for key in changed if key in RESUME_MUST_MATCH]
        if fatal:
            differences = [d for key in fatal for d in setting_differences(saved.get(key), now[key], key)]
            shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
            raise VLBridgeError(f"cannot resume {checkpoint}: it was trained with other {', '.join(fatal)} settings than this "
                                f"config ({shown}); use the config it was trained with, or another output_dir to start a new run")
        if changed:
            self.say(f"resuming with changed settings: {', '.join(changed)}")

    def say(self, message: str) -> None:
        if self.where.main:
            print(f"vlbridge train: {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()

    # -- sizes ------------------------------------------------------------------------------------
    def _total_steps(self) -> int:
        if self.config.steps is not None:
            return self.config.steps
        batches = BatchStream(self.train_set, self.config.batch_size, seed=self.config.seed, rank=self.where.rank,
                              world_size=self.where.world_size, num_workers=0, drop_last=self.config.drop_last).batches_per_epoch()
        steps = self.config.epochs * batches // self.config.grad_accum
        if steps < 1:
            raise VLBridgeError(f"epochs: {self.config.epochs} epoch(s) of {batches} batches make no step of grad_accum "
                                f"{self.config.grad_accum}; train longer or lower grad_accum")
        return steps


class Window:
    """Sums since the last metrics line: per-step mean losses of the finite steps, images, time."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.images = 0, 0
        self.grad_norm: float | None = None

    def add(self, step_means: Mapping[str, torch.Tensor]) -> None:
        for name, value in step_means.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.steps += 1

    def totals(self, skipped: int) -> dict[str, float]:
        return {**{name: float(value) for name, value in self.sums.items()}, "steps": float(self.steps),
                "images": float(self.images), "skipped": float(skipped)}

    def elapsed(self) -> float:
        return max(1e-9, time.monotonic() - self.started)
