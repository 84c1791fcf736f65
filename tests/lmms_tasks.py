"""Local lmms-eval tasks for the offline tests: two task YAMLs over a small dataset written next to
them (no hub). A short-answer VQA generation task (exact match) over JSON lines whose images are
PNG files, and a multiple-choice task (accuracy) over a parquet file whose images are embedded
(datasets decodes them to PIL), so both kinds of visual lmms-eval hands a model are covered."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

VQA_TASK = "vlbridge_local_vqa"
MC_TASK = "vlbridge_local_mc"
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")


def scene(colour: str, shape: str, size: int = 64) -> Image.Image:
    """One coloured shape on grey: images that differ, so answers can differ."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    return image


def examples(count: int) -> list[tuple[str, str]]:
    pairs = [(colour, shape) for shape in SHAPES for colour in COLOURS]
    return [pairs[i % len(pairs)] for i in range(count)]


VQA_YAML = f"""task: {VQA_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: vqa.jsonl
test_split: test
output_type: generate_until
doc_to_visual: image
doc_to_text: "What colour is the {{{{shape}}}}?"
doc_to_target: answer
generation_kwargs:
  until: ["###"]
  max_new_tokens: 6
  temperature: 0
  do_sample: false
  num_beams: 1
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""

MC_YAML = f"""task: {MC_TASK}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: mc.parquet
test_split: test
output_type: multiple_choice
doc_to_visual: image
doc_to_text: "Which shape is it?"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(folder: Path, count: int = 6) -> Path:
    """Both tasks and their data under `folder` (lmms-eval's --include_path); returns `folder`."""
    import json

    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (colour, shape) in enumerate(examples(count)):
        path = folder / "images" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        scene(colour, shape).save(path)
        rows.append({"id": i, "image": str(path.resolve()), "shape": shape, "answer": colour})
    (folder / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    features = datasets.Features({"image": datasets.Image(), "choices": datasets.Sequence(datasets.Value("string")),
                                  "label": datasets.Value("int64")})
    mc = {"image": [scene(c, s) for c, s in examples(count)], "choices": [list(SHAPES)] * count,
          "label": [SHAPES.index(s) for _, s in examples(count)]}
    datasets.Dataset.from_dict(mc, features=features).to_parquet(str(folder / "mc.parquet"))
    (folder / f"{VQA_TASK}.yaml").write_text(VQA_YAML, encoding="utf-8")
    (folder / f"{MC_TASK}.yaml").write_text(MC_YAML, encoding="utf-8")
    return folder


def vqa_inputs(folder: Path) -> tuple[list[str], list[str]]:
    """(image paths, questions) of the VQA task, in document order."""
    import json

    rows = [json.loads(line) for line in (folder / "vqa.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r["image"] for r in rows], [f"What colour is the {r['shape']}?" for r in rows]
