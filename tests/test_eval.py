"""vlbridge.evaluation.tasks and `vlbridge eval`: caption, VQA and retrieval runs on files the tests write
(COCO Karpathy-style caption JSON, VQAv2 questions + annotations, a few PIL images).

Stand-in models with known outputs check the numbers; tiny random presets check the whole path
(structure, valid ranges, and that metrics.json can be recomputed from predictions.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlbridge.evaluation import tasks as evaluate
from vlbridge.cli.main import main
from vlbridge.metrics import question_accuracy, score_captions
from vlbridge.modeling.retrieval import RetrievalResult

COLOURS = {1: (220, 20, 20), 2: (20, 200, 20), 3: (20, 20, 220), 4: (230, 230, 30)}
REFERENCES = {
    1: ["A red square on a plain background.", "A big red block.", "Red colour fills the picture."],
    2: ["A green square.", "A plain green picture.", "Something green and flat."],
    3: ["A blue square on a plain background.", "A blue block.", "Blue colour fills the picture."],
    4: ["A yellow square.", "A bright yellow picture.", "Yellow colour fills the image."],
}
QUESTIONS = [  # question_id, image_id, question, answers (10), answer_type, question_type
    (10, 1, "What color is it?", ["red"] * 9 + ["dark red"], "other", "what color is the"),
    (11, 2, "Is it green?", ["yes"] * 10, "yes/no", "is the"),
    (12, 3, "How many squares?", ["1"] * 6 + ["one"] * 2 + ["2"] * 2, "number", "how many"),
    (13, 4, "Is it red?", ["no"] * 8 + ["yes"] * 2, "yes/no", "is the"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evalset")
    (root / "images" / "val2014").mkdir(parents=True)
    for image_id, colour in COLOURS.items():
        Image.new("RGB", (40, 32), colour).save(root / "images" / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
    captions = [{"image": f"val2014/COCO_val2014_{i:012d}.jpg", "caption": refs} for i, refs in REFERENCES.items()]
    (root / "coco_karpathy_test.json").write_text(json.dumps(captions))
    questions = {"data_subtype": "val2014", "questions": [{"question_id": q, "image_id": i, "question": text}
                                                         for q, i, text, *_ in QUESTIONS]}
    annotations = {"annotations": [{"question_id": q, "image_id": i, "answer_type": at, "question_type": qt,
                                    "multiple_choice_answer": answers[0],
                                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)]}
                                   for q, i, _, answers, at, qt in QUESTIONS]}
    (root / "questions.json").write_text(json.dumps(questions))
    (root / "annotations.json").write_text(json.dumps(annotations))
    return {"root": root, "images": root / "images", "captions": root / "coco_karpathy_test.json",
            "questions": root / "questions.json", "annotations": root / "annotations.json"}


class KnownModel:
    """Answers, captions and retrieval scores fixed in advance, so the metrics can be worked by hand."""

    def __init__(self, captions=None, answers=None, scores=None):
        self.captions, self.answers, self.scores = captions, answers, scores
        self.calls: list[int] = []

    def caption(self, images, prompt=None, batch_size=16, **generation):
        self.calls.append(len(images))
        return [self.captions[Path(p).name] for p in images]

    def answer(self, images, questions, batch_size=16, **generation):
        self.calls.append(len(images))
        return [self.answers[q] for q in questions]

    def retrieve(self, images, texts, k=128, batch_size=64):
        itc = torch.tensor(self.scores)
        return RetrievalResult(itc=itc, i2t=itc.clone(), t2i=itc.t().clone())


def _name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


# -- the Python API with known outputs -------------------------------------------------------------
def test_caption_run_with_known_captions(files):
    groups = evaluate.load_caption_groups(files["captions"], files["images"])
    assert [g.image_id for g in groups] == [1, 2, 3, 4] and len(groups[0].captions) == 3
    # each prediction is its image's first reference: every candidate n-gram is found in a reference
    model = KnownModel(captions={_name(i): refs[0] for i, refs in REFERENCES.items()})
    result = evaluate.run_captions(model, groups, batch_size=3, tokenizer="python-ptb-approx", meteor=False)
    assert model.calls == [3, 1]  # batched as asked
    assert result.predictions == [{"image_id": i, "caption": refs[0]} for i, refs in REFERENCES.items()]
    m = result.metrics
    assert m["task"] == "caption" and m["tokenizer"] == "python-ptb-approx" and m["num_images"] == 4
    # all candidate n-grams match and each candidate's length equals one of its references': BLEU-1..4 = 1
    assert [m[f"Bleu_{n}"] for n in range(1, 5)] == pytest.approx([1.0] * 4, abs=1e-8)
    assert m["ROUGE_L"] == pytest.approx(1.0)
    assert 0 < m["CIDEr"] < 10 and m["METEOR"] is None


def test_vqa_run_with_known_answers(files):
    records = evaluate.load_vqa_records(files["questions"], files["annotations"], files["images"] / "val2014")
    answers = {"What color is it?": "Red.", "Is it green?": "Yes", "How many squares?": "one", "Is it red?": "yes"}
    result = evaluate.run_vqa(KnownModel(answers=answers), records, vqa_normalization="official")
    assert result.predictions == [{"question_id": q, "answer": answers[text]} for q, _, text, *_ in QUESTIONS]
    # q10 "Red." -> "red": 9 matches -> 1.0;  q11 "Yes" vs ten "yes": all agree, raw compare -> 0.0
    # q12 "one" -> "1": 6 matches -> 1.0 ("one" answers become "1" too: 8 matches);  q13 "yes": 2 matches -> 0.6
    m = result.metrics
    assert m["overall"] == pytest.approx(100 * (1.0 + 0.0 + 1.0 + 0.6) / 4)  # 65.0
    assert m["per_answer_type"] == {"number": 100.0, "other": 100.0, "yes/no": 30.0}
    assert m["normalization"] == "official" and m["num_questions"] == 4
    lavis = evaluate.evaluate_vqa(KnownModel(answers=answers), records, vqa_normalization="lavis")
    assert lavis["per_answer_type"]["yes/no"] == 80.0  # "Yes" normalised to "yes": q11 scores 1.0


def test_retrieval_run_with_known_scores(files):
    groups = evaluate.load_caption_groups(files["captions"], files["images"])[:2]  # 2 images x 3 captions
    # image 0's best own text (1, 0.8) is beaten by text 3 (0.9): rank 1; image 1's text 4 is on top: rank 0
    scores = [[0.1, 0.8, 0.2, 0.9, 0.0, 0.0], [0.5, 0.5, 0.5, 0.1, 0.9, 0.2]]
    result = evaluate.run_retrieval(KnownModel(scores=scores), groups)
    itc = result.metrics["itc"]
    assert itc["i2t_r1"] == 50.0 and itc["i2t_r5"] == 100.0
    # texts against images: text 0 (0.1 vs 0.5) rank 1, text 1 (0.8 vs 0.5) 0, text 2 (0.2 vs 0.5) 1,
    # text 3 (0.1 vs 0.9) rank 1, text 4 (0.9 vs 0.0) 0, text 5 (0.2 vs 0.0) 0 -> R@1 = 3/6
    assert itc["t2i_r1"] == 50.0 and result.metrics["itm"] == itc
    rows = result.predictions["image_to_text"]
    assert rows[0] == {"image_id": 1, "texts": [0, 1, 2], "rank": 1, "rank_itc": 1, "top": [3, 1, 2, 0, 4, 5]}
    assert [r["rank"] for r in result.predictions["text_to_image"]] == [1, 0, 1, 1, 0, 0]


def test_api_errors(files, tmp_path):
    groups = evaluate.load_caption_groups(files["captions"], files["images"])
    with pytest.raises(evaluate.VLBridgeError, match="bad evaluation options"):
        evaluate.run_captions(KnownModel(), groups, batch_size=0)
    with pytest.raises(evaluate.VLBridgeError, match="image file\\(s\\) not found"):
        evaluate.run_captions(KnownModel(), evaluate.load_caption_groups(files["captions"], tmp_path))
    with pytest.raises(evaluate.VLBridgeError, match="two predictions for image_id 1"):
        evaluate.score_caption_predictions([{"image_id": 1, "caption": "a"}] * 2, groups[:1])
    assert len(evaluate.load_caption_groups(files["captions"], files["images"], limit=2)) == 2


def test_karpathy_all_splits_file_with_split(files, tmp_path):
    images = [{"filepath": "val2014", "filename": _name(i), "cocoid": i, "split": "test" if i < 3 else "train",
               "sentences": [{"raw": r} for r in refs]} for i, refs in REFERENCES.items()]
    data = tmp_path / "dataset_coco.json"
    data.write_text(json.dumps({"dataset": "coco", "images": images}))
    groups = evaluate.load_caption_groups(data, files["images"], split="test")
    assert [g.image_id for g in groups] == [1, 2] and groups[1].captions == REFERENCES[2]
    assert len(evaluate.load_caption_groups(data, files["images"])) == 4  # no split: every image in the file


# -- tiny random models, end to end ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_opt():
    import vlbridge

    return vlbridge.build("tiny-qformer-opt")


def test_tiny_model_captions_and_vqa(files, tiny_opt):
    groups = evaluate.load_caption_groups(files["captions"], files["images"])
    run = evaluate.run_captions(tiny_opt, groups, generation={"num_beams": 1, "max_new_tokens": 4},
                                tokenizer="python-ptb-approx", meteor=False)
    m = run.metrics
    assert all(0.0 <= m[k] <= 1.0 for k in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L")) and 0.0 <= m["CIDEr"] <= 10.0
    again = score_captions({p["image_id"]: p["caption"] for p in run.predictions}, REFERENCES,
                           tokenizer="python-ptb-approx", meteor=False)
    assert all(again[k] == pytest.approx(m[k]) for k in ("Bleu_4", "ROUGE_L", "CIDEr"))
    records = evaluate.load_vqa_records(files["questions"], files["annotations"], files["images"] / "val2014")
    vqa = evaluate.run_vqa(tiny_opt, records, generation={"num_beams": 1, "max_new_tokens": 2})
    answers = {q: a for q, _, _, a, *_ in QUESTIONS}
    by_hand = [question_accuracy(p["answer"], answers[p["question_id"]]) for p in vqa.predictions]
    assert vqa.metrics["overall"] == round(100 * sum(by_hand) / 4, 2) and 0 <= vqa.metrics["overall"] <= 100


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_caption_writes_predictions_and_metrics(capsys, files, tmp_path):
    out = tmp_path / "caption"
    code, stdout, err = run_cli(capsys, "eval", "-a", "tiny-qformer-opt", "--task", "caption", "--data", str(files["captions"]),
                                "--images", str(files["images"]), "--out", str(out), "--num-beams", "1",
                                "--max-new-tokens", "3", "--no-meteor", "--batch-size", "2")
    assert code == 0, err
    assert "CIDEr" in stdout and "tokenizer:" in stdout and "  2/4" in err
    predictions = json.loads((out / "predictions.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(p["image_id"] for p in predictions) == [1, 2, 3, 4] and all(isinstance(p["caption"], str) for p in predictions)
    assert metrics["tokenizer"] in ("java-ptb", "python-ptb-approx") and metrics["run"]["options"]["batch_size"] == 2
    again = score_captions({p["image_id"]: p["caption"] for p in predictions}, REFERENCES, tokenizer=metrics["tokenizer"], meteor=False)
    assert all(again[k] == pytest.approx(metrics[k]) for k in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"))
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_cli_vqa_and_retrieval(capsys, files, tmp_path):
    code, stdout, err = run_cli(capsys, "eval", "-a", "tiny-qformer-opt", "--task", "vqa", "--data", str(files["questions"]),
                                "--annotations", str(files["annotations"]), "--images", str(files["images"] / "val2014"),
                                "--out", str(tmp_path / "vqa"), "--num-beams", "1", "--max-new-tokens", "2", "--limit", "3",
                                "--vqa-normalize", "simple", "--quiet")
    assert code == 0, err
    predictions = json.loads((tmp_path / "vqa" / "predictions.json").read_text())
    metrics = json.loads((tmp_path / "vqa" / "metrics.json").read_text())
    assert [p["question_id"] for p in predictions] == [10, 11, 12] and metrics["normalization"] == "simple"
    answers = {q: a for q, _, _, a, *_ in QUESTIONS}
    by_hand = [question_accuracy(p["answer"], answers[p["question_id"]], "simple") for p in predictions]
    assert metrics["overall"] == round(100 * sum(by_hand) / 3, 2) and "normalisation: simple" in stdout
    code, stdout, err = run_cli(capsys, "eval", "-a", "tiny-qformer-opt", "--task", "retrieval", "--data", str(files["captions"]),
                                "--images", str(files["images"]), "--out", str(tmp_path / "ret"), "--k", "3", "--json", "--quiet")
    assert code == 0, err
    printed = json.loads(stdout)
    predictions = json.loads((tmp_path / "ret" / "predictions.json").read_text())
    for source in ("itc", "itm"):
        ranks = [r[f"rank{'' if source == 'itm' else '_itc'}"] for r in predictions["image_to_text"]]
        assert printed[source]["i2t_r1"] == pytest.approx(100 * sum(r < 1 for r in ranks) / 4)
        ranks = [r[f"rank{'' if source == 'itm' else '_itc'}"] for r in predictions["text_to_image"]]
        assert printed[source]["t2i_r5"] == pytest.approx(100 * sum(r < 5 for r in ranks) / 12)
        assert 0 <= printed[source]["r_mean"] <= 100
    assert printed["num_texts"] == 12 and printed["k"] == 3


def test_cli_bad_input_exits_2(capsys, files, tmp_path):
    base = ["eval", "-a", "tiny-qformer-opt", "--no-meteor"]
    cases = [
        (["--task", "caption", "--data", str(tmp_path / "nope.json")], "does not exist"),
        (["--task", "caption", "--data", str(files["captions"]), "--annotations", str(files["annotations"])], "--annotations is for --task vqa"),
        (["--task", "caption", "--data", str(files["captions"]), "--images", str(tmp_path)], "image file(s) not found"),
        (["--task", "caption", "--data", str(files["captions"]), "--limit", "0"], "--limit must be at least 1"),
        (["--task", "vqa", "--data", str(files["questions"]), "--images", str(tmp_path / "missing")], "is not a directory"),
        (["--task", "vqa", "--data", str(files["annotations"])], "expected an object with a 'questions' list"),
        (["--task", "vqa", "--data", str(files["questions"]), "--split", "test"], "--split is for caption and retrieval"),
        (["--task", "retrieval", "--data", str(files["captions"]), "--num-beams", "3", "--prompt", "x"],
         "--prompt, --num-beams do not apply to --task retrieval"),
        (["--task", "caption", "--data", str(files["captions"]), "--k", "5"], "--k does not apply to --task caption"),
        (["--task", "vqa", "--data", str(files["questions"]), "--tokenizer", "none"], "--tokenizer does not apply to --task vqa"),
        (["--task", "retrieval", "--data", str(files["captions"]), "--limit", "1"], "retrieval among fewer than 2 images"),
    ]
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    cases.append((["--task", "caption", "--data", str(bad)], "malformed JSON"))
    for extra, message in cases:
        code, _, err = run_cli(capsys, *base, *extra)
        assert code == 2 and message in err, (extra, err)
    code, _, err = run_cli(capsys, "eval", "-a", "tiny-mlp-opt", "--task", "retrieval", "--data", str(files["captions"]),
                           "--images", str(files["images"]), "--quiet")
    assert code == 2 and "need a Q-Former connector" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "-a", "tiny-qformer-opt", "--task", "translate", "--data", "x"])
    assert exit_info.value.code == 2


class ShortlistModel(KnownModel):
    """Re-ranks only each query's ITC top k, leaving -100 elsewhere, as BLIP-2's retrieval does."""

    def retrieve(self, images, texts, k=128, batch_size=64):
        itc = torch.tensor(self.scores)

        def rerank(sims):
            out = torch.full_like(sims, -100.0)
            for row in range(sims.shape[0]):
                top = sims[row].topk(min(k, sims.shape[1])).indices
                out[row, top] = sims[row, top] + 1.0
            return out

        return RetrievalResult(itc=itc, i2t=rerank(itc), t2i=rerank(itc.t()))


def test_retrieval_with_a_short_itm_shortlist_ranks_the_rest_by_itc(files):
    groups = evaluate.load_caption_groups(files["captions"], files["images"])[:2]  # 2 images x 3 captions
    # image 0's own texts are 0-2, ITC ranks them 3rd-5th; with k=1 only text 3 is re-ranked
    scores = [[0.3, 0.2, 0.1, 0.9, 0.5, 0.4], [0.5, 0.5, 0.5, 0.1, 0.9, 0.2]]
    result = evaluate.run_retrieval(ShortlistModel(scores=scores), groups, k=1)
    itc, itm = result.metrics["itc"], result.metrics["itm"]
    assert itc["i2t_r5"] == itm["i2t_r5"] == 100.0 and itc["t2i_r5"] == itm["t2i_r5"] == 100.0
    row = result.predictions["image_to_text"][0]
    assert row["rank"] == row["rank_itc"] == 3 and row["top"] == [3, 4, 5, 0, 1, 2]
