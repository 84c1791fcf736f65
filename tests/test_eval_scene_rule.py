"""`vlbridge eval --task retrieval` reproduces the retrieval numbers `vlbridge compare` reports: compare
scores a world's retrieval by its scene rule (a caption is right for every image of an identical
scene) on the captions at `retrieval_captions`, which eval had no way to ask for. `--scenes` and
`--retrieval-captions` (with the split's k and compare's batch size) now give compare's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vlbridge
from vlbridge.cli.main import main
from vlbridge.compare import runner
from vlbridge.compare.config import CompareConfig, EvalSet, RunSpec
from vlbridge.evaluation import tasks as evaluate
from vlbridge.evaluation.scenes import SCENE_RULE
from vlbridge.modeling.retrieval import RetrievalResult

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 32 one-object test images of world seed 5, 28 distinct scenes: with the tiny model's random weights
# the rule moves R@10 (a world where it moved nothing would not show that eval applies it)
WORLD = {"seed": 5, "train": 0, "val": 0, "test": 32, "comp": 0, "min_objects": 1, "max_objects": 1, "questions_per_image": 1,
         "image_size": 16}
POSITIONS, K, COMPARE_BATCH = [0, 1], 3, 64  # the 'scene' and 'inventory' captions; compare's retrieval batch (retrieve's default)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from vlbridge.world import WorldConfig, generate_world

    root = tmp_path_factory.mktemp("world")
    generate_world(root, WorldConfig(**WORLD))
    return root


def test_eval_with_scenes_gives_compare_numbers(world, tmp_path, capsys):
    checkpoint = tmp_path / "stage1"
    vlbridge.build("tiny-qformer-opt", stage=1).save(checkpoint)
    spec = EvalSet(name="test", captions=str(world / "captions_test.json"), images=str(world), scenes=str(world / "scenes_test.json"),
                   tasks=["retrieval"], retrieval_k=K, retrieval_captions=POSITIONS)
    data = {"format": "coco", "paths": [spec.captions], "image_root": str(world)}
    config = CompareConfig(name="c", runs=[RunSpec(name="q", assembly="tiny-qformer-opt", init_from=str(checkpoint), stage2_steps=1)],
                           stage2_data=data, evals=[spec], output_dir=str(tmp_path / "out"), device="cpu")
    compared = runner.shared_retrieval(config, *runner.stage1_source(config, config.runs[0], 0), spec, say=lambda line: None)

    evaluated = _eval(capsys, checkpoint, world, "--scenes", spec.scenes, "--retrieval-captions", *map(str, POSITIONS),
                      "--k", str(K), "--batch-size", str(COMPARE_BATCH))
    assert compared["distinct_scenes"] == evaluated["distinct_scenes"] == 28
    assert (evaluated["num_images"], evaluated["num_texts"], evaluated["rule"]) == (32, 64, SCENE_RULE)
    for head in ("itc", "itm"):
        for name, value in compared[head].items():
            assert evaluated[head][name] == value, (head, name)
    assert evaluated["run"]["options"]["scenes"] == spec.scenes and evaluated["run"]["options"]["retrieval_captions"] == POSITIONS
    own_image_only = _eval(capsys, checkpoint, world, "--retrieval-captions", *map(str, POSITIONS), "--k", str(K),
                           "--batch-size", str(COMPARE_BATCH))
    assert any(own_image_only[head][name] != value for head in ("itc", "itm") for name, value in compared[head].items())


def _eval(capsys, checkpoint: Path, world: Path, *flags: str) -> dict:
    code = main(["eval", "--checkpoint", str(checkpoint), "--task", "retrieval", "--data", str(world / "captions_test.json"),
                 "--images", str(world), *flags, "--json", "--quiet"])
    assert code == 0
    return json.loads(capsys.readouterr().out)


class Twins:
    """Texts ranked for each image in a fixed order: image 0 ranks image 1's caption first (the two
    show identical scenes), image 2 its own."""

    def retrieve(self, images, texts, k=128, batch_size=64):
        itc = torch.tensor([[0.5, 0.9, 0.1], [0.9, 0.5, 0.1], [0.1, 0.2, 0.9]])
        return RetrievalResult(itc=itc, i2t=itc.clone(), t2i=itc.t().clone())


def test_scenes_credit_a_caption_of_an_identical_scene(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    captions = [{"image": f"{i}.png", "image_id": i, "caption": [f"scene {i}", f"other {i}"]} for i in range(3)]
    scenes = [{"image_id": i, "objects": [{"shape": "star", "colour": "red" if i < 2 else "blue", "row": 0, "col": 0, "dx": 0.1 * i}]}
              for i in range(3)]
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    (tmp_path / "scenes.json").write_text(json.dumps(scenes))
    groups = evaluate.load_caption_groups(tmp_path / "captions.json", tmp_path)
    own = evaluate.run_retrieval(Twins(), groups, retrieval_captions=[0]).metrics
    shared = evaluate.run_retrieval(Twins(), groups, retrieval_captions=[0], scenes=str(tmp_path / "scenes.json")).metrics
    assert own["itc"]["i2t_r1"] == pytest.approx(100 / 3) and own["itc"]["t2i_r1"] == pytest.approx(100 / 3)
    assert shared["itc"]["i2t_r1"] == shared["itc"]["t2i_r1"] == 100.0 and shared["distinct_scenes"] == 2
    assert "rule" not in own


@pytest.mark.parametrize("extra, message", [
    (["--retrieval-captions", "9"], "retrieval_captions: image 0 has 2 captions, none at positions [9]"),
    (["--scenes", "missing.json"], "missing.json"),
    (["--retrieval-captions", "0", "0"], "caption positions [0, 0]: give one or more positions from 0, each once"),
])
def test_bad_retrieval_settings_fail_before_the_model_loads(tmp_path, capsys, monkeypatch, extra, message):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "1.png")
    (tmp_path / "captions.json").write_text(json.dumps([{"image": f"{i}.png", "image_id": i, "caption": ["a", "b"]} for i in range(2)]))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("vlbridge.cli.evaluate.open_model", lambda source: pytest.fail("the model loaded"))
    code = main(["eval", "-a", "tiny-qformer-opt", "--task", "retrieval", "--data", "captions.json", *extra])
    assert code == 2 and message in capsys.readouterr().err


def test_scene_flags_are_for_retrieval_only(capsys, tmp_path):
    code = main(["eval", "-a", "tiny-qformer-opt", "--task", "caption", "--data", str(tmp_path / "c.json"), "--scenes", "s.json"])
    assert code == 2 and "--scenes does not apply to --task caption" in capsys.readouterr().err
