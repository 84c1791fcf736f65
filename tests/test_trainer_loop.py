"""The training loop in-process: non-finite losses, checkpoint contents, gradient accumulation,
stage 1 then stage 2 from its checkpoint, and the projectors trained by the same loop."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vlbridge
import vlbridge.train
from tests.test_trainer_resume import without_timing
from tests.test_trainer_samples import Recording, config, mse_objective, read_metrics, train_losses, write_caption_data
from vlbridge.errors import VLBridgeError
from vlbridge.train import checkpointing
from vlbridge.train.progress import ProgressBar
from vlbridge.train.trainer import NonFiniteLossError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_caption_data(tmp_path_factory.mktemp("data"))


def linear_config(data: Path, out: Path, **overrides):
    return config(data, out, **{"assembly": "tiny-linear-opt", "stage": 2, **overrides})


def test_a_nonfinite_loss_skips_its_step(tmp_path, data):
    recording = Recording(nan_calls={2})
    result = vlbridge.train.run(linear_config(data, tmp_path / "out", steps=5, log_every=1), objective=recording)
    assert result.step == 5 and result.nonfinite == 1
    weights = recording.weights  # the first trainable tensor as each forward pass found it
    assert torch.equal(weights[2], weights[3])  # the NaN step updated nothing
    assert all(not torch.equal(weights[i], weights[i + 1]) for i in (0, 1, 3))
    assert not any(recording.leftover_grads)  # gradients are zeroed after a skip as after a step
    metrics = read_metrics(tmp_path / "out")
    assert [m["nonfinite"] for m in metrics] == [0, 0, 1, 1, 1]
    assert "loss" not in metrics[2] and all("loss" in m for m in metrics[3:])  # nothing finite to average at step 3


def test_max_nonfinite_in_a_row_stops_the_run(tmp_path, data):
    values = linear_config(data, tmp_path / "out", steps=8, max_nonfinite=2, save_every=1)
    with pytest.raises(NonFiniteLossError, match=r"stopped at step 3: 2 non-finite losses in a row \(max_nonfinite: 2\)") as info:
        vlbridge.train.run(values, objective=Recording(nan_calls={1, 2, 3}))
    assert "checkpoints/step-2." in str(info.value)  # points at the last checkpoint
    recovered = vlbridge.train.run(linear_config(data, tmp_path / "again", steps=4, max_nonfinite=2), objective=Recording(nan_calls={0, 2}))
    assert recovered.nonfinite == 2  # not in a row: the run goes on


def test_checkpoint_contents(tmp_path, data):
    out = tmp_path / "out"
    vlbridge.train.run(linear_config(data, out, steps=4, save_every=2, keep_last=1, grad_clip=1.0, tensorboard=True), objective=mse_objective)
    steps = out / "checkpoints"
    assert (steps / "latest").read_text().strip() == "step-4"
    assert sorted(p.name for p in steps.iterdir()) == ["latest", "step-4"]  # keep_last: 1
    assert sorted(p.name for p in (steps / "step-4").glob("trainer_state.*")) == ["trainer_state.safetensors"]  # nothing pickled
    state = checkpointing.load_trainer_state(steps / "step-4")
    assert state["step"] == 4 and state["world_size"] == 1 and state["scaler"] is None
    assert len(state["optimizer"]["state"]) == 2 and state["scheduler"]["step_count"] == 4
    rank = state["ranks"][0]
    assert rank["data"] == {"epoch": 0, "samples": 16, "streams": {}, "last_stream": None}  # 4 steps x 4 = all 16 samples
    assert isinstance(rank["rng"]["torch"], torch.Tensor) and len(rank["rng"]["numpy"][1]) == 624
    assert isinstance(rank["rng"]["python"], tuple) and sorted(state["optimizer"]["state"]) == [0, 1]  # as torch and random want them
    model = vlbridge.load(steps / "step-4")  # an ordinary vlbridge checkpoint too
    saved = load_file(steps / "step-4" / "connector.safetensors")
    assert all(torch.equal(saved[n], p) for n, p in model.connector.named_parameters())
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [2, 4]
    assert {"epoch", "loss", "mse", "lr", "grad_norm", "images_per_s", "skipped", "nonfinite"} <= set(metrics[0])
    assert (out / "tensorboard").is_dir() == (importlib.util.find_spec("tensorboard") is not None)  # optional


def test_progress_bar_redraws_one_line_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    bar = ProgressBar(total=10, stream=stream)
    bar.update(5, loss=2.5, lr=1e-4, img_s=12.0)
    bar.write("evaluated")
    bar.close()
    text = stream.getvalue()
    assert "\r\x1b[2K[############............] 5/10 loss 2.5 lr 1.00e-04 img_s 12 eta" in text
    assert "evaluated\n" in text and text.endswith("\n")


def test_grad_accum_equals_the_larger_batch(tmp_path, data):
    big = vlbridge.train.run(linear_config(data, tmp_path / "big", steps=3, batch_size=4), objective=mse_objective)
    small = vlbridge.train.run(linear_config(data, tmp_path / "acc", steps=3, batch_size=2, grad_accum=2), objective=mse_objective)
    a, b = load_file(big.checkpoint / "connector.safetensors"), load_file(small.checkpoint / "connector.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert train_losses(tmp_path / "big") == pytest.approx(train_losses(tmp_path / "acc"), rel=1e-5)


def test_epochs_and_bf16(tmp_path, data):
    result = vlbridge.train.run(linear_config(data, tmp_path / "out", steps=None, epochs=2, grad_accum=3, precision="bf16"),
                                objective=mse_objective)
    assert result.step == 2  # 2 epochs x 4 batches of 4 = 8 batches = 2 steps of 3 (the rest unused)
    assert all(t.dtype == torch.float32 for t in load_file(result.checkpoint / "connector.safetensors").values())
    assert all(torch.isfinite(torch.tensor(loss)) for loss in train_losses(tmp_path / "out"))


def test_stage1_then_stage2_from_its_checkpoint(tmp_path, data):
    stage1 = vlbridge.train.run(config(data, tmp_path / "s1", with_eval=True, steps=16, log_every=4))
    losses = train_losses(tmp_path / "s1")
    assert losses[-1] < losses[0] and {"itc", "itm", "itg"} <= set(stage1.train)
    assert stage1.eval is not None and stage1.eval["step"] == 16 and "eval_itg" in stage1.eval
    recording = Recording(objective=vlbridge.train.objectives.Stage2Objective(prompt="a photo of"))
    vlbridge.train.run(config(data, tmp_path / "s2", stage=2, init_from=str(tmp_path / "s1"), steps=12, log_every=4,
                              prompt="a photo of", optimizer={"lr": 3e-3}), objective=recording)
    started_from = load_file(stage1.checkpoint / "connector.safetensors")["query_tokens"]
    assert torch.equal(recording.weights[0], started_from)  # query_tokens: the first trainable tensor
    losses = train_losses(tmp_path / "s2")
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("preset", ["tiny-linear-opt", "tiny-mlp-opt"])
def test_projectors_train_with_the_stage2_objective(tmp_path, data, preset):
    result = vlbridge.train.run(config(data, tmp_path / "out", assembly=preset, stage=2, steps=10, log_every=5, optimizer={"lr": 3e-3}))
    losses = train_losses(tmp_path / "out")
    assert set(result.train) >= {"loss", "lm"} and losses[-1] < losses[0]
    assert vlbridge.load(result.checkpoint).plan.connector.name == preset.split("-")[1]


def test_a_fresh_start_sets_an_earlier_runs_metrics_aside(tmp_path, data, capsys):
    """A run stopped before its first checkpoint leaves metrics.jsonl but nothing to resume: the next
    start (with or without --resume) used to append to it, so steps 1.. appeared twice."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n', encoding="utf-8")
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.earlier").write_bytes(b"earlier run")
    vlbridge.train.run(linear_config(data, out, steps=4, save_every=2), resume=True, objective=mse_objective)
    assert [m["step"] for m in read_metrics(out)] == [2, 4]
    kept = list(out.glob("metrics.before-*.jsonl"))
    assert len(kept) == 1 and kept[0].read_text(encoding="utf-8").count("\n") == 2
    boards = list(out.glob("tensorboard.before-*"))  # its events would have plotted steps 1-2 twice
    assert len(boards) == 1 and (boards[0] / "events.out.tfevents.earlier").is_file()
    assert not (out / "tensorboard" / "events.out.tfevents.earlier").exists()
    assert f"they are kept in {kept[0].name}" in capsys.readouterr().err


def test_a_resumed_run_says_its_connector_is_the_checkpoints(tmp_path, data, capsys):
    out = tmp_path / "out"
    vlbridge.train.run(linear_config(data, out, steps=4, save_every=2), objective=mse_objective)
    capsys.readouterr()
    vlbridge.train.run(linear_config(data, out, steps=6, save_every=2), resume=True, objective=mse_objective)
    err = capsys.readouterr().err
    assert "from step 4" in err and "connector as saved at step 4" in err and "from scratch" not in err


def test_init_from_a_run_into_another_llm_is_noted(tmp_path, data, capsys):
    first = tmp_path / "t5"
    t5 = {"name": "linear-t5", "encoder": {"use": "eva-vit-g", "options": {"variant": "tiny"}}, "connector": {"use": "linear"},
          "llm": {"use": "flan-t5", "options": {"variant": "tiny"}}}
    vlbridge.train.run(config(data, first, assembly=t5, stage=2, steps=2, save_every=2, schedule={"warmup_steps": 0}),
                       objective=mse_objective)
    capsys.readouterr()
    vlbridge.train.run(linear_config(data, tmp_path / "opt", steps=2, save_every=2, init_from=str(first), schedule={"warmup_steps": 0}),
                       objective=mse_objective)
    assert "trained its connector into the LLM 'flan-t5', and this run bridges to 'opt'" in capsys.readouterr().err


class Killed(BaseException):
    """Stands for a SIGKILL: nothing of the run after it happens."""


def test_a_run_killed_after_its_last_checkpoint_has_logged_its_last_evaluation(tmp_path, data, monkeypatch):
    """The last step's evaluation came after its checkpoint (eval_every not dividing steps): a run killed
    between the two resumed at the last step with nothing left to do, and its final eval_loss was lost."""
    from vlbridge.train.trainer import Trainer

    values = dict(with_eval=True, steps=4, save_every=2, eval_every=3, log_every=1)
    vlbridge.train.run(linear_config(data, tmp_path / "whole", **values), objective=mse_objective)
    save = Trainer.save

    def save_then_die(trainer: Trainer) -> int:
        step = save(trainer)
        if step == 4:
            raise Killed
        return step

    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(Killed):
        vlbridge.train.run(linear_config(data, tmp_path / "killed", **values), objective=mse_objective)
    monkeypatch.setattr(Trainer, "save", save)
    vlbridge.train.run(linear_config(data, tmp_path / "killed", **values), resume=True, objective=mse_objective)
    expected, got = without_timing(read_metrics(tmp_path / "whole")), without_timing(read_metrics(tmp_path / "killed"))
    assert [m["step"] for m in expected if "eval_loss" in m] == [3, 4]
    assert got == expected


def test_a_run_killed_before_its_first_latest_pointer_resumes(tmp_path, data, monkeypatch, capsys):
    """Killed between renaming step-2 into place and writing `latest` (the run's first checkpoint):
    --resume refused, asking the user to write the pointer by hand; it resumes from that one step."""
    values = dict(steps=4, save_every=2, log_every=1)
    vlbridge.train.run(linear_config(data, tmp_path / "whole", **values), objective=mse_objective)
    write_text = checkpointing.atomic_write_text

    def die_at_the_pointer(path, text):
        if Path(path).name == checkpointing.LATEST:
            raise Killed
        return write_text(path, text)

    monkeypatch.setattr(checkpointing, "atomic_write_text", die_at_the_pointer)
    with pytest.raises(Killed):
        vlbridge.train.run(linear_config(data, tmp_path / "killed", **values), objective=mse_objective)
    monkeypatch.setattr(checkpointing, "atomic_write_text", write_text)
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["step-2"]
    with pytest.raises(VLBridgeError, match="pass --resume to continue from it") as plain:  # a start without --resume
        vlbridge.train.run(linear_config(data, tmp_path / "killed", **values), objective=mse_objective)
    assert "by hand" not in str(plain.value) and "write step-2 into" not in str(plain.value)
    capsys.readouterr()
    vlbridge.train.run(linear_config(data, tmp_path / "killed", **values), resume=True, objective=mse_objective)
    assert "resuming from the one complete checkpoint, step-2" in capsys.readouterr().err
    final = "checkpoints/step-4/connector.safetensors"
    expected, got = load_file(tmp_path / "whole" / final), load_file(tmp_path / "killed" / final)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert without_timing(read_metrics(tmp_path / "killed")) == without_timing(read_metrics(tmp_path / "whole"))
