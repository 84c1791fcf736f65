"""Both stages cut texts at max_text_tokens (as LAVIS) and now say so: the objective counts the rows
it cut (stage 2: and those left with no target token), and the trainer warns once per run. A row with no target
token adds nothing to the loss or its item count, and a batch of nothing but such rows gives a zero
loss over zero items (it used to raise, ending the run, and under DDP only on the rank that drew it)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import vlbridge
from tests.test_objectives import make_batch
from tests.test_trainer_samples import config, read_metrics, write_caption_data, write_config
from vlbridge.errors import VLBridgeError
from vlbridge.train.objectives import LOSS_ITEMS, Stage1Objective, Stage2Objective
from vlbridge.train.text_cuts import TextCuts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LONG = "please describe every single detail of this picture " * 6  # alone far more than 32 tokens
QUESTIONS = ["what is it?", LONG, "what colour?", LONG]
ANSWERS = ["a cat", "a dog", "red", "a cat"]


def pairs(model: Any, questions: list[str] = QUESTIONS, answers: list[str] = ANSWERS) -> dict[str, Any]:
    return {**make_batch(model), "text_input": list(questions), "text_output": list(answers)}


def rows(batch: dict[str, Any], keep: list[int]) -> dict[str, Any]:
    return {key: value[keep] if isinstance(value, torch.Tensor) else [value[i] for i in keep] for key, value in batch.items()}


@pytest.fixture(scope="module")
def model() -> Any:
    return vlbridge.build("tiny-linear-opt", stage=2).eval()  # no dropout: the same rows give the same losses


@pytest.mark.parametrize("loss_average", ["tokens", "samples"])
def test_rows_with_no_target_token_change_neither_the_loss_nor_its_item_count(model: Any, loss_average: str):
    objective = Stage2Objective(loss_average=loss_average)
    out = objective(model, pairs(model))
    taught = objective(model, rows(pairs(model), [0, 2]))
    assert math.isfinite(out["loss"].item())
    assert out["lm"].item() == pytest.approx(taught["lm"].item(), rel=1e-5)
    assert out[LOSS_ITEMS].item() == taught[LOSS_ITEMS].item()
    assert objective.text_cuts["eval"] == TextCuts(32, rows=6, cut=2, untaught=2)  # 4 rows, then 2: the two long ones
    assert objective.text_cuts["train"].rows == 0  # the model is in eval mode


@pytest.mark.parametrize("loss_average", ["tokens", "samples"])
def test_a_batch_with_no_target_token_is_a_zero_loss_over_no_item(model: Any, loss_average: str):
    model.train()
    try:
        out = Stage2Objective(loss_average=loss_average)(model, rows(pairs(model), [1, 3]))
        assert out["loss"].item() == 0.0 and out[LOSS_ITEMS].item() == 0.0
        out["loss"].backward()  # on the graph: under DDP every rank's backward must reach the trainable tensors
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(p.grad is not None and not p.grad.any() for p in trainable)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_a_prompt_that_fills_max_text_tokens_alone_is_still_refused(model: Any):
    """The objective's own prompt is every row's input: every batch would learn nothing."""
    with pytest.raises(VLBridgeError, match=r"the prompt fills all 32 text tokens; raise objective.max_text_tokens"):
        Stage2Objective(prompt=LONG)(model, make_batch(model))


def test_cut_captions_are_counted_and_a_longer_budget_cuts_none(model: Any):
    captions = ["a cat", "a cat " + "and a dog " * 20, "red", "a bird"]
    objective = Stage2Objective()
    objective(model, make_batch(model, captions))
    assert objective.text_cuts["eval"] == TextCuts(32, rows=4, cut=1, untaught=0)
    roomy = Stage2Objective(max_text_tokens=128)
    roomy(model, make_batch(model, captions))
    assert roomy.text_cuts["eval"] == TextCuts(128, rows=4)


def test_counting_cuts_tokenises_again_only_the_texts_that_filled_the_budget(model: Any, monkeypatch: pytest.MonkeyPatch):
    """The count runs on every training batch: a text shorter than max_text_tokens cannot have been cut,
    so only the texts that filled it are tokenised a second time (a batch of short captions: none)."""
    seen: list[list[str]] = []
    tokenize = model.llm.tokenize
    monkeypatch.setattr(model.llm, "tokenize", lambda texts, **kw: (seen.append(list(texts)), tokenize(texts, **kw))[1])
    objective = Stage2Objective()
    objective(model, make_batch(model, ["a cat", "red", "a bird", "a dog"]))
    assert len(seen) == 2  # the texts and their inputs, as training needs them: nothing more
    long = "a cat " + "and a dog " * 20
    seen.clear()
    objective(model, make_batch(model, ["a cat", long, "red", "a bird"]))
    assert len(seen) == 3 and len(seen[2]) == 1 and seen[2][0].startswith(long)  # the one long caption, once more
    assert objective.text_cuts["eval"] == TextCuts(32, rows=8, cut=1, untaught=0)


def test_flan_t5_counts_inputs_and_targets_cut():
    model = vlbridge.build("tiny-qformer-flan-t5", stage=2).eval()
    objective = Stage2Objective()
    objective(model, {**make_batch(model), "text_input": QUESTIONS, "text_output": ["yes", "no", LONG, "red"]})
    assert objective.text_cuts["eval"] == TextCuts(32, rows=4, cut=3, untaught=0)  # rows 1 and 3 (input), 2 (target)


def test_text_cuts_summary_and_warning():
    assert TextCuts(32, rows=10).summary() == ""
    cuts = TextCuts(32, rows=10, cut=3, untaught=1)
    assert cuts.summary("training texts") == "3 of 10 training texts cut at objective.max_text_tokens 32; 1 left with no target token"
    warning = cuts.warning("training texts", so_far=True)
    assert warning.startswith("warning: so far 3 of 10 training texts were cut at objective.max_text_tokens 32 and lost their "
                              "last tokens; 1 kept no target token at all (the input alone fills the budget), so it adds nothing")
    assert "Raise objective.max_text_tokens (e.g. objective: {max_text_tokens: 64}" in warning
    assert "so far" not in TextCuts(32, rows=4, cut=1).warning("validation texts", so_far=False)
    assert cuts.with_counts({"rows": 20.0, "cut": 6.0, "untaught": 2.0}) == TextCuts(32, rows=20, cut=6, untaught=2)


def test_stage1_tokenises_once_at_the_limit_plus_one_and_again_only_the_cut_rows():
    """The one pass at limit + 1 trimmed (re-tokenising only the cut rows) gives the very ids and masks of
    the tokenizer's own cut at the limit, for texts just under, at, one past and far past it."""
    qformer = vlbridge.build("tiny-qformer-opt", stage=1).connector
    texts = [" ".join(["a"] * (tokens - 2)) for tokens in (5, 31, 32, 33, 34, 80)]  # [CLS] a a ... [SEP]
    calls: list[int] = []
    tokenizer = qformer.tokenizer
    counting = SimpleNamespace(tokenizer=lambda batch, **kwargs: calls.append(len(batch)) or tokenizer(batch, **kwargs))
    ids, mask, cut = Stage1Objective().tokenize(counting, texts, torch.device("cpu"))
    expected = tokenizer(texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    natural = [len(tokenizer(text)["input_ids"]) for text in texts]
    assert natural == [5, 31, 32, 33, 34, 80] and cut.tolist() == [False, False, False, True, True, True]
    assert calls == [6, 3]  # every text once, the cut ones twice


def test_stage1_counts_cut_captions_by_the_models_mode():
    model = vlbridge.build("tiny-qformer-opt", stage=1).eval()
    objective = Stage1Objective()
    objective(model, make_batch(model, ["a cat", "a cat " + "and a dog " * 20, "red", "a bird"]))
    assert objective.text_cuts["eval"] == TextCuts(32, rows=4, cut=1, room=objective.text_cuts["eval"].room)
    assert objective.text_cuts["train"].rows == 0
    assert "max_text_positions" in objective.text_cuts["eval"].warning("validation texts", so_far=False)


def long_captions(data: Path, rows: set[int]) -> Path:
    """train.jsonl with the captions of `rows` far past 32 Q-Former tokens."""
    lines = [json.loads(line) for line in (data / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    for i in rows:
        lines[i]["text"] += " and a dog" * 20
    (data / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in lines), encoding="utf-8")
    return data


@pytest.mark.parametrize("long_rows", [{1, 6}, set()])
def test_a_stage1_run_warns_once_with_the_count_of_long_captions(tmp_path: Path, capsys: pytest.CaptureFixture, long_rows: set[int]):
    import vlbridge.train

    data = long_captions(write_caption_data(tmp_path / "data"), long_rows)
    cfg = config(data, tmp_path / "run", steps=2, log_every=1, schedule={"warmup_steps": 0})
    cfg["data"]["train"]["shuffle"] = False
    result = vlbridge.train.run(cfg)
    err = capsys.readouterr().err
    if long_rows:  # row 1 in step 1, row 6 in step 2
        assert err.count("warning: so far 1 of 4 training texts were cut at objective.max_text_tokens 32 and lost their last "
                         "tokens. Raise objective.max_text_tokens (e.g. objective: {max_text_tokens: 64}; the Q-Former's") == 1
        assert err.count("were cut") == 1
        assert result.texts == "2 of 8 training texts cut at objective.max_text_tokens 32"
    else:
        assert "were cut" not in err and result.texts == ""


def write_pairs(data: Path, long_rows: set[int], long_val_rows: set[int] | None = None) -> Path:
    """train.jsonl / val.jsonl as instruction pairs; the rows in `long_rows` (of val.jsonl: `long_val_rows`,
    default the same) have an input that fills max_text_tokens."""
    for name, long in (("train", long_rows), ("val", long_rows if long_val_rows is None else long_val_rows)):
        lines = (data / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        rows_out = []
        for i, line in enumerate(lines):
            row = json.loads(line)
            row.update(text_input=LONG if i in long else "what is it?", text_output=row["text"])
            rows_out.append(json.dumps(row) + "\n")
        (data / f"{name}.jsonl").write_text("".join(rows_out), encoding="utf-8")
    return data


def test_training_warns_once_with_the_counts_and_skips_a_step_with_nothing_to_learn(tmp_path: Path, capsys: pytest.CaptureFixture):
    """Batch size 1 without shuffling: the rows with a long input are whole steps with no target token.
    Such a step updates nothing (it raised before, ending the run); the run ends with every count."""
    import vlbridge.train

    data = write_pairs(write_caption_data(tmp_path / "data"), long_rows={1, 2})
    cfg = config(data, tmp_path / "run", assembly="tiny-linear-opt", stage=2, batch_size=1, steps=4, log_every=1,
                 with_eval=True, schedule={"warmup_steps": 0})
    cfg["data"]["train"]["shuffle"] = False
    result = vlbridge.train.run(cfg)
    err = capsys.readouterr().err
    assert err.count("warning: so far 1 of 2 training texts were cut at objective.max_text_tokens 32 and lost their last "
                     "tokens; 1 kept no target token") == 1
    assert err.count("training texts were cut") == 1  # once per run, though the next step cuts one more
    assert "step 2: no text of the whole batch kept a target token" in err and "step 3: no text" in err
    assert err.count("warning: 2 of 4 validation texts were cut") == 1  # 4 validation rows, 2 of them long
    assert result.texts == "2 of 4 training texts cut at objective.max_text_tokens 32; 2 left with no target token"
    metrics = read_metrics(tmp_path / "run")
    assert [("loss" in m) for m in metrics[:4]] == [True, False, False, True]  # the empty steps log no loss
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m) and math.isfinite(metrics[-1]["eval_loss"])


def test_a_resumed_run_counts_the_texts_cut_before_the_resume_and_warns_once(tmp_path: Path, capsys: pytest.CaptureFixture):
    """The run's total, as the skipped samples' count, covers the steps trained before a resume, and
    the warning given before it is not given again: the checkpoint keeps each rank's count."""
    import vlbridge.train

    data = write_pairs(write_caption_data(tmp_path / "data"), long_rows={1, 2})
    cfg = config(data, tmp_path / "run", assembly="tiny-linear-opt", stage=2, batch_size=1, steps=2, log_every=1,
                 schedule={"warmup_steps": 0})
    cfg["data"]["train"]["shuffle"] = False
    assert vlbridge.train.run(cfg, quiet=True).texts.startswith("1 of 2 training texts cut")  # rows 0 and 1
    assert capsys.readouterr().err.count("training texts were cut") == 1
    result = vlbridge.train.run({**cfg, "steps": 4}, resume=True, quiet=True)  # rows 2 and 3
    assert result.texts == "2 of 4 training texts cut at objective.max_text_tokens 32; 2 left with no target token"
    assert "training texts were cut" not in capsys.readouterr().err


def test_an_evaluation_with_no_target_token_logs_no_eval_loss(tmp_path: Path, capsys: pytest.CaptureFixture):
    """Its mean is over no item: it was logged as an eval_loss of 0."""
    import vlbridge.train

    data = write_pairs(write_caption_data(tmp_path / "data"), long_rows=set(), long_val_rows={0, 1, 2, 3})
    result = vlbridge.train.run(config(data, tmp_path / "run", assembly="tiny-linear-opt", stage=2, steps=1, with_eval=True,
                                       schedule={"warmup_steps": 0}))
    assert "step 1: the validation data gave no item to score (no text kept a target token" in capsys.readouterr().err
    assert result.eval is None and not any("eval_loss" in m for m in read_metrics(tmp_path / "run"))
    assert result.texts == ""  # no training text was cut


def test_train_check_says_it_does_not_count_cut_texts_and_where_the_count_comes(tmp_path: Path, capsys: pytest.CaptureFixture):
    from vlbridge.cli.main import main

    data = write_caption_data(tmp_path / "data")
    for stage, assembly, objective in ((2, "tiny-linear-opt", {"max_text_tokens": 48}), (1, "tiny-qformer-opt", {})):
        values = config(data, tmp_path / f"run{stage}", assembly=assembly, stage=stage, objective=objective)
        assert main(["train", "--check", str(write_config(tmp_path / f"stage{stage}.yaml", values))]) == 0
        out = capsys.readouterr().out
        if stage == 2:
            assert "texts: stage 2 cuts each at objective.max_text_tokens 48 LLM tokens, prompt included; --check does not" in out
            assert "training warns once with the count, and with the rows left with no target token" in out
        else:
            assert ("texts: stage 1 cuts each at objective.max_text_tokens 32 Q-Former tokens, [CLS] and [SEP] included; "
                    "--check does not count how many that cuts (it loads no tokenizer): training warns once with the count\n") in out


def test_under_ddp_a_rank_whose_batch_has_no_target_token_trains_on_with_the_others(tmp_path: Path):
    """Batch 1 on 2 ranks, unshuffled: step 1 gives rank 1 a row with no target token (it raised there
    alone, and rank 0 waited in the all-reduce), step 2 gives both ranks one (the step is skipped).
    Launched by torchrun itself (`python -m torch.distributed.run`, as the README runs it): the other
    multi-process tests start their ranks with torchrun's environment but without its agent."""
    import subprocess
    import sys

    from tests.test_trainer_ddp import free_port
    from tests.test_trainer_samples import subprocess_env

    data = write_pairs(write_caption_data(tmp_path / "data"), long_rows={1, 2, 3})
    values = config(data, tmp_path / "run", assembly="tiny-linear-opt", stage=2, batch_size=1, steps=3, log_every=1,
                    schedule={"warmup_steps": 0})
    values["data"]["train"]["shuffle"] = False
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "vlbridge", "train", str(write_config(tmp_path / "c.yaml", values))]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "step 2: no text of the whole batch kept a target token" in done.stderr
    assert "texts: 3 of 6 training texts cut at objective.max_text_tokens 32; 3 left with no target token" in done.stdout
    assert [("loss" in m) for m in read_metrics(tmp_path / "run")] == [True, False, True]


def test_a_run_whose_every_text_keeps_no_target_token_stops_after_max_nonfinite_steps(tmp_path: Path, capsys: pytest.CaptureFixture):
    """Every input fills max_text_tokens: each step was skipped with a warning, and the run went on to its
    last step and wrote an untrained checkpoint. It now stops after max_nonfinite such steps in a row."""
    import vlbridge.train

    data = write_pairs(write_caption_data(tmp_path / "data"), long_rows={0, 1, 2, 3, 4, 5, 6, 7})
    cfg = config(data, tmp_path / "run", assembly="tiny-linear-opt", stage=2, batch_size=1, steps=8, log_every=1,
                 max_nonfinite=3, save_every=2, schedule={"warmup_steps": 0})
    cfg["data"]["train"]["shuffle"] = False
    with pytest.raises(VLBridgeError, match=r"stopped at step 3: 3 steps in a row had no target token in their whole batch "
                                            r"\(max_nonfinite: 3\).*fill objective\.max_text_tokens.*Last checkpoint: .*step-2"):
        vlbridge.train.run(cfg)
    assert "step 2: no text of the whole batch kept a target token (each one's input filled objective.max_text_tokens); " \
           "step skipped (2/3 in a row)" in capsys.readouterr().err
