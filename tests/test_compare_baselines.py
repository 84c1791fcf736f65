"""The comparison's reference rows (blind answer prior, chance retrieval) and its progress line,
on hand-made files whose answers are worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlbridge.compare.baselines import blind_row, chance_retrieval, question_type_prior
from vlbridge.compare.config import EvalSet
from vlbridge.compare.progress import PhaseProgress


def _annotation(qid: int, image: int, qtype: str, answer: str) -> dict:
    return {"question_id": qid, "image_id": image, "question_type": qtype, "answer_type": "other",
            "multiple_choice_answer": answer, "answers": [{"answer": answer, "answer_id": i + 1} for i in range(10)]}


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    train = [_annotation(1, 1, "how many", "2"), _annotation(2, 1, "how many", "2"), _annotation(3, 2, "how many", "3"),
             _annotation(4, 2, "what color is the", "red")]
    test = [_annotation(11, 5, "how many", "2"), _annotation(12, 5, "how many", "1"), _annotation(13, 6, "what color is the", "blue"),
            _annotation(14, 6, "what color is the", "red")]
    questions = [{"question_id": a["question_id"], "image_id": a["image_id"], "question": "q?"} for a in test]
    captions = [{"image": "a.png", "image_id": 5, "caption": ["one", "two"]}, {"image": "b.png", "image_id": 6, "caption": ["three"]},
                {"image": "c.png", "image_id": 7, "caption": ["four"]}]
    scenes = [{"image_id": 5, "objects": [{"shape": "circle"}]}, {"image_id": 6, "objects": [{"shape": "square"}]},
              {"image_id": 7, "objects": [{"shape": "circle"}]}]  # 7 shows the same scene as 5
    paths = {"train": tmp_path / "ann_train.json", "ann": tmp_path / "ann_test.json", "q": tmp_path / "q_test.json",
             "captions": tmp_path / "captions.json", "scenes": tmp_path / "scenes.json"}
    paths["train"].write_text(json.dumps({"annotations": train}))
    paths["ann"].write_text(json.dumps({"annotations": test}))
    paths["q"].write_text(json.dumps({"questions": questions}))
    paths["captions"].write_text(json.dumps(captions))
    paths["scenes"].write_text(json.dumps(scenes))
    return paths


def test_question_type_prior_is_the_commonest_training_answer(files):
    assert question_type_prior(files["train"]) == {"how many": "2", "what color is the": "red"}


def test_blind_row_scores_the_prior_and_chance(files):
    spec = EvalSet(name="test", captions=str(files["captions"]), questions=str(files["q"]), annotations=str(files["ann"]),
                   images=str(files["q"].parent), image_pattern="{image_id}.png", scenes=str(files["scenes"]))
    row = blind_row(files["train"], [spec], files["captions"])
    assert row["eval"]["test"]["vqa"]["overall"] == pytest.approx(50.0)  # right on questions 11 and 14
    assert row["eval"]["test"]["caption"]["Bleu_1"] > 0  # "one" (the first of the tied commonest) matches image 5 exactly
    retrieval = row["eval"]["test"]["retrieval"]["itm"]
    # i2t: images 5 and 7 share a scene with captions {one, two, four} (3 of 4), image 6 owns 1 of 4
    assert retrieval["i2t_r1"] == pytest.approx(100 * (3 / 4 + 1 / 4 + 3 / 4) / 3)
    # t2i: captions of scene {5, 7} find one of 2 right images among 3; "three" finds 1 of 3
    assert retrieval["t2i_r1"] == pytest.approx(100 * (2 / 3 * 3 + 1 / 3) / 4)
    assert chance_retrieval(spec) == row["eval"]["test"]["retrieval"]


def test_progress_line_follows_weights():
    lines: list[str] = []
    progress = PhaseProgress([("a: stage 1", 30.0), ("a: stage 2", 10.0), ("b: stage 2", 60.0)], lines.append, label="demo")
    progress.start("a: stage 1")
    progress.start("a: stage 2")
    progress.finish()
    progress.skip("b", 0)  # nothing named "b seed 0: ..." here: no change
    assert "[demo ........................   0%]" in lines[0] and lines[0].endswith("· a: stage 1")
    assert " 30%]" in lines[1]
    assert progress.line("x").startswith("[demo #########...............  40%]")


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_estimates_from_the_first_timed_steps_and_times_each_kind_apart():
    clock, lines = _Clock(), []
    phases = [("a seed 0: stage 1", 30.0), ("a seed 0: stage 2", 20.0), ("a seed 0: evaluate", 40.0),
              ("b seed 0: stage 2", 20.0), ("b seed 0: evaluate", 40.0)]
    progress = PhaseProgress(phases, lines.append, label="demo", clock=clock)
    progress.start("a seed 0: stage 1")
    assert "estimating time left" in lines[-1]
    for step in range(1, 7):  # 10 s a stage-1 step; the first report only marks the time (building came before it)
        clock.now = 10.0 * step
        progress.step(step)
    # printed during stage 1 (PRINT_EVERY passed): stage 1's 4 steps left at 10 s, the rest guessed from that rate
    assert len(lines) == 2 and "estimating" not in lines[-1] and lines[-1].endswith("· a seed 0: stage 1")
    assert " 12%]" in lines[-1] and "roughly 7 min left" in lines[-1]  # 40 s + 120 weight x 10/3 s: ~7.3 min
    for step in range(7, 11):
        clock.now = 10.0 * step
        progress.step(step)
    progress.start("a seed 0: stage 2")
    for step in range(1, 6):  # 2 s a stage-2 step, timed apart from stage 1's
        clock.now = 100.0 + 2 * step
        progress.step(step)
    seconds, rough = progress.time_left()
    guessed = (90 + 8) / (27 + 4)  # seconds per weight over what is timed: the evaluations' stand-in
    assert rough and seconds == pytest.approx(15 * 2 + 20 * 2 + 80 * guessed)
    clock.now = 120.0
    progress.start("a seed 0: evaluate")
    clock.now = 220.0  # 100 s for an evaluation of weight 40
    progress.start("b seed 0: stage 2")
    assert lines[-1].endswith("~2:20 left · b seed 0: stage 2")  # every kind timed: 20 x 2 s + 40 x 2.5 s, no longer rough
