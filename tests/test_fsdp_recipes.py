"""FSDP2 beyond the frozen bridge's stage 2 (issue 23): stage 1 with the encoder sharded, LoRA
adapters and an unfrozen encoder block inside the shards, activation checkpointing of the LLM's
blocks, and bf16. Two processes (gloo) on half the batch each train as one process on the whole
batch: the same losses, applied gradients and trained tensors in fp32; bf16 within a stated
tolerance of fp32.

All two-process runs share one launch (each launch costs ~10 s of start-up on 2 cores): the
workers train the configs one after another in one process group, while this process trains the
one-process references.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.test_trainer_ddp import train_both
from tests.test_trainer_samples import config, one_process_group, read_metrics, train_recording, write_caption_data

STEPS = 3
FSDP = {"strategy": "fsdp", "shard": ["llm", "encoder"]}
# tiny-mlp-opt reading the tiny CLIP's last block (the preset reads the one before, so one block runs)
TWO_BLOCK_ENCODER = {"name": "tiny-mlp-opt-last", "encoder": {"use": "clip-vit-l", "options": {"variant": "tiny", "include_cls": False, "layer": -1}},
                     "connector": {"use": "mlp"}, "llm": {"use": "opt", "options": {"variant": "tiny"}}}
# the encoder's last block trains (the first stays frozen and sharded) with layer decay and its own
# checkpointing; LoRA on OPT's q_proj / v_proj. Adapter dropout off: its mask is drawn per rank.
TUNED = {"encoder": {"unfreeze": 1, "layer_decay": 0.8, "grad_checkpointing": True},
         "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "lr": 3e-3}}
# bf16 against fp32 (measured on these runs, 3 steps): the loss moves by at most 2e-5 relative,
# because a random tiny LM's logits are small (its loss sits near log(vocab)) and bf16's rounding of
# them shifts it little; 1e-3 is that with room for other kernels. The loss alone would miss a broken
# policy, so step 1's gradients (same weights in both runs; later steps differ through AdamW) are
# compared too: bf16 keeps 8 significant bits (2^-9 relative rounding per value), and the gradient
# tensors differ from fp32 by 1.4-3.4% in norm; 5% bounds that, while a gradient not averaged over
# the ranks (2x), a shard gathered wrong or a part computed in the wrong dtype is off by O(100%).
BF16_LOSS_RTOL = 1e-3
BF16_GRAD_RTOL = 5e-2


def stage1(data: Path, out: Path, batch_size: int, **overrides: Any) -> dict[str, Any]:
    """Stage 1 of tiny-qformer-opt with the encoder sharded (stage 1 builds no LLM). One and two
    processes compute the same numbers under `exact_stage1` (as the DDP test): dropout off, ITM's
    hardest negative instead of a sampled one (drawn per rank), ITC's gather keeping gradients.

    AdamW's eps is raised to 1e-3: ITC sums the gathered similarities in another order, so some
    gradient elements that are rounding noise (~2e-6) differ between the runs, and AdamW steps such
    an element by +-lr whatever its size; with a large eps its step is proportional to its gradient,
    so the trained weights can be compared at fp32 tolerance too."""
    return config(data, out, steps=STEPS, log_every=1, save_every=STEPS, batch_size=batch_size,
                  optimizer={"lr": 1e-3, "eps": 1e-3}, parallel={"strategy": "fsdp", "shard": ["encoder"]}, **overrides)


def stage2(data: Path, out: Path, batch_size: int, **overrides: Any) -> dict[str, Any]:
    """Stage 2 of tiny-mlp-opt (no dropout anywhere; both encoder blocks run) with the encoder's last
    block and LoRA adapters training, on solid images (a crop or flip drawn per rank changes no pixel)."""
    values = {"assembly": TWO_BLOCK_ENCODER, "stage": 2, "steps": STEPS, "log_every": 1, "save_every": STEPS,
              "batch_size": batch_size, "schedule": {"warmup_steps": 0}, "finetune": TUNED, "parallel": FSDP}
    return config(data, out, **{**values, **overrides})


# name -> (config maker, global batch, overrides); "-2" runs in two processes (half the batch each), "-1" in this one.
# Stage 1 reads captions of one length (its ITG is a mean of rank means), stage 2 of unequal lengths.
RUNS = {
    "stage1-2": (stage1, 4, {}),
    "tuned-2": (stage2, 8, {}),
    "tuned-ac-2": (stage2, 8, {"parallel": {**FSDP, "activation_checkpointing": True}}),
    "tuned-bf16-2": (stage2, 8, {"precision": "bf16"}),
    "stage1-1": (stage1, 4, {}),
    "tuned-1": (stage2, 8, {}),
    "tuned-ac-1": (stage2, 8, {"parallel": {"activation_checkpointing": True}}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_torch_thread) -> Path:
    """Every run of this module: the two-process ones in one launch, the one-process references here."""
    root = tmp_path_factory.mktemp("fsdp")
    data = {stage1: write_caption_data(root / "even"), stage2: write_caption_data(root / "uneven", uneven=True)}
    values = {name: make(data[make], root / name, batch // int(name[-1]), **overrides) for name, (make, batch, overrides) in RUNS.items()}
    train_both("tests.test_fsdp_recipes", root, {name: run for name, run in values.items() if name.endswith("-2")},
               {name: run for name, run in values.items() if name.endswith("-1")})
    return root


def assert_same_steps(root: Path, one: str, other: str, names: tuple[str, ...]) -> None:
    """Equal logged losses and applied gradients at every step (fp32: a batch of 8 and two of 4 sum
    in another order); a two-process run's ranks apply the very same gradients."""
    a_metrics, b_metrics = read_metrics(root / one), read_metrics(root / other)
    assert len(a_metrics) == len(b_metrics) == STEPS
    for a, b in zip(a_metrics, b_metrics):
        for name in names:
            assert b[name] == pytest.approx(a[name], rel=1e-5), (a["step"], name, a[name], b[name])
    for step in range(1, STEPS + 1):
        reference = torch.load(root / f"grads-{one}" / f"rank0-step{step}.pt", weights_only=True)
        ranks = [torch.load(path, weights_only=True) for path in sorted((root / f"grads-{other}").glob(f"rank*-step{step}.pt"))]
        assert len(reference) == len(ranks[0])
        assert all(torch.equal(x, y) for rank in ranks[1:] for x, y in zip(ranks[0], rank))  # averaged: the same on every rank
        for x, y in zip(reference, ranks[0]):
            # the temperature (the only scalar) as in the DDP test: its gradient nearly cancels, ~1e-6 from rounding
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5 if x.dim() == 0 else 1e-6)


def trained_tensors(run: Path) -> dict[str, torch.Tensor]:
    """What the last checkpoint holds of each trained part: connector, encoder tensors, LoRA adapters."""
    step = run / "checkpoints" / f"step-{STEPS}"
    return {f"{file}:{key}": value for file in ("connector", "encoder", "lora")
            if (step / f"{file}.safetensors").exists() for key, value in load_file(step / f"{file}.safetensors").items()}


def assert_same_tensors(one: Path, two: Path) -> None:
    a, b = trained_tensors(one), trained_tensors(two)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def shards(root: Path, name: str) -> dict[str, int]:
    """The parts each rank of a two-process run sharded, with their block counts."""
    found = [json.loads((root / f"grads-{name}-2" / f"rank{r}-shards.json").read_text()) for r in (0, 1)]
    assert found[0] == found[1]
    return found[0]


def test_stage1_with_the_encoder_sharded_matches_one_process(runs):
    assert shards(runs, "stage1") == {"encoder": 2}  # stage 1 builds no LLM; the encoder block by block
    assert_same_steps(runs, "stage1-1", "stage1-2", ("loss", "itc", "itm", "itg"))
    assert_same_tensors(runs / "stage1-1", runs / "stage1-2")


def test_lora_and_an_unfrozen_encoder_block_train_inside_the_shards(runs):
    assert shards(runs, "tuned") == {"llm": 2, "encoder": 2}
    assert_same_steps(runs, "tuned-1", "tuned-2", ("loss", "lm"))
    assert_same_tensors(runs / "tuned-1", runs / "tuned-2")
    tensors = trained_tensors(runs / "tuned-2")
    assert any(key.startswith("lora:") for key in tensors) and any(key.startswith("encoder:") for key in tensors)


def test_activation_checkpointing_changes_no_number(runs):
    """Recomputing the LLM's blocks in the backward pass gives what storing them gives, in one
    process (ddp strategy) and under FSDP (composed with the shards and the LoRA adapters in them)."""
    for run in ("tuned-ac-1", "tuned-ac-2"):
        assert_same_steps(runs, "tuned-1", run, ("loss", "lm"))
        assert_same_tensors(runs / "tuned-1", runs / run)


def test_bf16_under_fsdp_stays_near_fp32(runs):
    """bf16 (FSDP2's policy: gathered weights and compute in bf16, reductions in fp32) against the
    one-process fp32 run: each loss, and step 1's gradients (BF16_LOSS_RTOL / BF16_GRAD_RTOL say why)."""
    fp32, bf16 = read_metrics(runs / "tuned-1"), read_metrics(runs / "tuned-bf16-2")
    assert len(bf16) == STEPS
    for a, b in zip(fp32, bf16):
        assert b["loss"] == pytest.approx(a["loss"], rel=BF16_LOSS_RTOL), (a["step"], a["loss"], b["loss"])
        assert b["loss"] != a["loss"]  # it did compute in bf16
    reference, grads = (torch.load(runs / f"grads-{run}" / "rank0-step1.pt", weights_only=True) for run in ("tuned-1", "tuned-bf16-2"))
    for x, y in zip(reference, grads):
        assert y.dtype == torch.float32  # trained tensors and their gradients stay fp32
        if x.norm() == 0:  # LoRA's A before B has moved off zero
            assert y.norm() == 0
        else:
            assert float((y - x).norm() / x.norm()) < BF16_GRAD_RTOL


def main(argv: list[str]) -> int:
    """`python -m tests.test_fsdp_recipes CONFIG GRADS [CONFIG GRADS ...]` (one rank): train each
    config in turn in one process group, recording the applied gradients and the parts sharded."""
    from vlbridge.train import fsdp

    shard_model, seen = fsdp.shard_model, {}

    def recording_shard_model(model, parts, **kwargs):
        done = shard_model(model, parts, **kwargs)
        seen.update({part.name: part.blocks for part in done})
        return done

    fsdp.shard_model = recording_shard_model
    with one_process_group() as rank:  # the trainer joins it and leaves it open for the next config
        for config_path, grads in zip(argv[::2], argv[1::2]):
            seen.clear()
            train_recording(config_path, Path(grads))
            (Path(grads) / f"rank{rank}-shards.json").write_text(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
