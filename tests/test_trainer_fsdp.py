"""FSDP2 (parallel.strategy: fsdp) on CPU with gloo: two processes that shard the frozen LLM and
encoder train exactly as one process on the same global batch (stage 2, OPT-like and T5-like), each
rank holds about half of the LLM's parameter bytes, the checkpoints are one-process checkpoints
both ways (init_from a one-process checkpoint; vlbridge.load of the FSDP one), and resuming under
FSDP continues the uninterrupted run."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_trainer_ddp import train_both
from tests.test_trainer_samples import config, one_process_group, read_metrics, train_recording, write_caption_data

STEPS = 4
T5_ASSEMBLY = {"name": "tiny-mlp-t5", "encoder": {"use": "clip-vit-l", "options": {"variant": "tiny", "include_cls": False}},
               "connector": {"use": "mlp"}, "llm": {"use": "flan-t5", "options": {"variant": "tiny"}}}
FSDP = {"strategy": "fsdp", "shard": ["llm", "encoder"]}


def stage2_config(data: Path, output_dir: Path, assembly, **overrides) -> dict:
    """Stage 2 of an MLP projector (no dropout) on solid images: 1 and 2 processes compute the same numbers."""
    return config(data, output_dir, **{"assembly": assembly, "stage": 2, "log_every": 1, **overrides})


def fsdp_config(data: Path, output_dir: Path, assembly, **overrides) -> dict:
    return stage2_config(data, output_dir, assembly, steps=STEPS, save_every=2, **overrides)


def connector_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    import vlbridge

    return {k: v.detach() for k, v in vlbridge.load(checkpoint).connector.state_dict().items()}


ASSEMBLIES = {"opt": "tiny-mlp-opt", "t5": T5_ASSEMBLY}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_torch_thread) -> Path:
    """The module's first two-process runs, each in root/NAME with its gradients in root/grads-NAME, in
    one launch (each costs seconds of start-up): `opt-2` and `t5-2` (with their one-process references
    `opt-1` and `t5-1`, trained here meanwhile), `full` (cut and resumed by the resume test) and `s2`
    (stage 2 from the encoder that `s1` fine-tuned). Both two-process runs start from a one-process
    checkpoint, `start-opt` / `start-t5`: it must load under FSDP."""
    import vlbridge.train

    root = tmp_path_factory.mktemp("fsdp")
    # T5 trains as a prefix LM whose split point is drawn per rank: only 3-word captions (one possible
    # split) give 1 and 2 processes the same targets; OPT gets captions of unequal lengths
    data = {"opt": write_caption_data(root / "uneven", uneven=True), "t5": write_caption_data(root / "even")}
    two, here = {}, {}
    for name, assembly in ASSEMBLIES.items():
        start = vlbridge.train.run(stage2_config(data[name], root / f"start-{name}", assembly, steps=1, batch_size=8, schedule={})).checkpoint
        two[f"{name}-2"] = fsdp_config(data[name], root / f"{name}-2", assembly, batch_size=4, init_from=str(start), parallel=FSDP)
        here[f"{name}-1"] = fsdp_config(data[name], root / f"{name}-1", assembly, batch_size=8, init_from=str(start))
    two["full"] = fsdp_config(data["opt"], root / "full", "tiny-mlp-opt", batch_size=4, parallel=FSDP)
    tuned = vlbridge.train.run(config(write_caption_data(root / "eight", images=8), root / "s1", steps=1, batch_size=4, schedule={},
                                      finetune={"encoder": {"unfreeze": 1}})).checkpoint
    two["s2"] = stage2_config(root / "eight", root / "s2", "tiny-qformer-opt", steps=1, batch_size=2, schedule={}, init_from=str(tuned),
                              parallel=FSDP)
    train_both("tests.test_trainer_fsdp", root, two, here)
    return root


@pytest.mark.parametrize("assembly", list(ASSEMBLIES))
def test_fsdp_two_processes_match_one_and_share_the_llm(runs, assembly):
    one, two = runs / f"{assembly}-1", runs / f"{assembly}-2"
    a_metrics, b_metrics = read_metrics(one), read_metrics(two)
    assert len(a_metrics) == len(b_metrics) == STEPS
    for a, b in zip(a_metrics, b_metrics):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
    for step in range(1, STEPS + 1):
        reference = torch.load(runs / f"grads-{assembly}-1" / f"rank0-step{step}.pt", weights_only=True)
        rank0, rank1 = (torch.load(runs / f"grads-{assembly}-2" / f"rank{r}-step{step}.pt", weights_only=True) for r in (0, 1))
        assert all(torch.equal(x, y) for x, y in zip(rank0, rank1))  # averaged: the same on every rank
        for x, y in zip(reference, rank0):  # fp32: a batch of 8 and two of 4 sum in another order
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)
    # the FSDP checkpoint is a one-process checkpoint: vlbridge.load reads it, with the same weights
    a, b = (connector_of(run / "checkpoints" / f"step-{STEPS}") for run in (one, two))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)

    shares = [json.loads((runs / f"grads-{assembly}-2" / f"rank{r}-shards.json").read_text()) for r in (0, 1)]
    full = shares[0]["llm_full"]
    for share in shares:
        assert share["llm_local"] == pytest.approx(full / 2, rel=0.05), share  # each rank holds about half
        assert share["blocks"]["llm"] > 1 and share["blocks"]["encoder"] >= 1  # sharded block by block (found, not whole)


def test_fsdp_resume_continues_the_uninterrupted_run(runs, tmp_path):
    """The fixture's `full` run as it was when killed after step 2, resumed in a launch of its own."""
    cut = tmp_path / "cut"
    shutil.copytree(runs / "full", cut)
    shutil.rmtree(cut / "checkpoints" / f"step-{STEPS}")
    (cut / "checkpoints" / "latest").write_text("step-2\n")
    metrics = cut / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= 2))
    train_both("tests.test_trainer_fsdp", tmp_path, {"cut": {**yaml.safe_load((runs / "full.yaml").read_text()), "output_dir": str(cut)}}, {})
    assert without_speed(cut) == without_speed(runs / "full")
    full, resumed = (connector_of(run / "checkpoints" / f"step-{STEPS}") for run in (runs / "full", cut))
    for key in full:
        assert torch.equal(resumed[key], full[key]), key


def test_fsdp_saves_the_encoder_tensors_init_from_brought(runs):
    """A stage-1 run that fine-tuned the encoder (`s1`), then stage 2 under FSDP from it with the
    encoder frozen (`s2`): its restored tensors now lie in the encoder's shards, and the checkpoint
    stores them whole (it died writing them: safetensors cannot save a sharded tensor)."""
    from safetensors.torch import load_file

    tuned, saved = Path(yaml.safe_load((runs / "s2.yaml").read_text())["init_from"]), runs / "s2" / "checkpoints" / "step-1"
    expected, got = (load_file(directory / "encoder.safetensors") for directory in (tuned, saved))
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    connector_of(saved)  # and it loads in one process


def without_speed(output_dir: Path) -> list[dict]:
    """The metrics lines without the throughput each one measures."""
    return [{k: v for k, v in m.items() if k != "images_per_s"} for m in read_metrics(output_dir)]


def main(argv: list[str]) -> int:
    """`python -m tests.test_trainer_fsdp CONFIG.yaml GRADS_DIR [CONFIG GRADS_DIR ...]` (one rank):
    train (or resume) each config in turn recording gradients, and write this rank's share of the
    LLM's bytes."""
    from vlbridge.train import fsdp

    shard_model, seen = fsdp.shard_model, {}

    def recording_shard_model(model, parts, **kwargs):
        seen["llm_full"] = fsdp.local_bytes(model.llm)
        done = shard_model(model, parts, **kwargs)
        seen["llm_local"] = fsdp.local_bytes(model.llm)
        seen["blocks"] = {part.name: part.blocks for part in done}
        return done

    fsdp.shard_model = recording_shard_model
    with one_process_group() as rank:
        for config_path, grads in zip(argv[::2], argv[1::2]):
            seen.clear()
            train_recording(config_path, Path(grads), resume=True)
            if seen:  # fsdp sharded something
                (Path(grads) / f"rank{rank}-shards.json").write_text(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def test_parallel_section_is_checked_with_its_yaml_path(tmp_path):
    from vlbridge.train.config import TrainConfigError, check_config, read_config

    data = write_caption_data(tmp_path / "data", images=4)
    stage1 = config(data, tmp_path / "out", parallel={"strategy": "fsdp", "shard": ["llm"], "activation_checkpointing": True})
    with pytest.raises(TrainConfigError) as caught:
        check_config(*read_config(stage1))
    assert caught.value.problems == ["parallel.shard: stage 1 builds no LLM; shard [encoder] only",
                                     "parallel.activation_checkpointing: stage 1 runs no LLM; it checkpoints the LLM's blocks in stage 2"]
    with pytest.raises(TrainConfigError, match="parallel.strategy"):
        read_config(config(data, tmp_path / "out", parallel={"strategy": "zero3"}))
    default, _ = read_config(config(data, tmp_path / "out"))
    assert default.parallel.strategy == "ddp" and default.parallel.parts(1) == []
    assert read_config(config(data, tmp_path / "out", parallel={"strategy": "fsdp"}))[0].parallel.parts(2) == ["llm", "encoder"]


def test_fsdp_settings_under_ddp_are_refused_not_ignored(tmp_path):
    """`shard` (or reshard_after_forward) without strategy: fsdp ran DDP, a whole model on every rank,
    with no word: a 7B LLM meant to be sharded ran out of memory instead."""
    from vlbridge.train.config import TrainConfigError, check_config, read_config

    data = write_caption_data(tmp_path / "data", images=4)
    meant = config(data, tmp_path / "out", stage=2, assembly="tiny-mlp-opt", parallel={"shard": ["llm"], "reshard_after_forward": False})
    with pytest.raises(TrainConfigError) as caught:
        check_config(*read_config(meant))
    assert [problem.split(":")[0] for problem in caught.value.problems] == ["parallel.shard", "parallel.reshard_after_forward"]
    assert all("strategy: fsdp" in problem for problem in caught.value.problems)
    check_config(*read_config(config(data, tmp_path / "out", parallel={"strategy": "ddp", "activation_checkpointing": False})))


def test_fsdp_in_one_process_says_it_shards_nothing(tmp_path, capfd, one_torch_thread):
    """`vlbridge train` of an fsdp config without torchrun trained one whole model in silence (the
    plan even read 'one process'): a 7B run launched the wrong way ran out of memory with no word why."""
    import vlbridge.train

    data = write_caption_data(tmp_path / "data", images=4)
    vlbridge.train.run(stage2_config(data, tmp_path / "out", "tiny-mlp-opt", steps=1, batch_size=2, schedule={}, parallel=FSDP))
    assert "fsdp in one process shards nothing" in capfd.readouterr().err


def test_blocks_are_found_generically_or_the_part_is_whole():
    from torch import nn

    from vlbridge.train import fsdp

    assert fsdp.find_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) == ([], "whole")
    encoder_like = nn.Module()
    encoder_like.blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    assert fsdp.find_blocks(encoder_like) == (list(encoder_like.blocks), "finetune_blocks")
