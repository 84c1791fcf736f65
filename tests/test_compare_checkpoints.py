"""`vlbridge compare` puts imported checkpoints side by side, untrained: a (tiny, random) LLaVA-1.5
projector imported from transformers and a BLIP-2 Q-Former imported from transformers, scored on the
same evaluation data in one table."""

from __future__ import annotations

import json

import pytest

import vlbridge
from tests.hf_tiny import make_generation_model
from tests.test_hf_llava import make_llava
from vlbridge.compare.config import CompareConfig, EvalSet, RunSpec
from vlbridge.compare.run import run_compare

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_compare_evaluates_imported_llava_and_blip2_side_by_side(tmp_path):
    from vlbridge.world import WorldConfig, generate_world

    world = tmp_path / "world"
    generate_world(world, WorldConfig(train=0, val=0, test=6, comp=0, questions_per_image=2))
    make_llava(tmp_path / "hf-llava")
    make_generation_model(tmp_path / "hf-blip2")
    llava = vlbridge.import_hf_llava(tmp_path / "hf-llava", tmp_path / "llava")
    blip2 = vlbridge.import_hf_blip2(tmp_path / "hf-blip2", tmp_path / "blip2")
    evals = [EvalSet(name="test", captions=str(world / "captions_test.json"), questions=str(world / "questions_test.json"),
                     annotations=str(world / "annotations_test.json"), images=str(world),
                     image_pattern="images/world_test_{image_id:07d}.png", tasks=["caption", "vqa"])]
    config = CompareConfig(name="imported", runs=[RunSpec(name="llava-1.5", checkpoint=str(llava)),
                                                  RunSpec(name="blip2", checkpoint=str(blip2))],
                           evals=evals, output_dir=str(tmp_path / "out"), generation={"num_beams": 1, "max_new_tokens": 3})
    said: list[str] = []
    run_compare(config, say=said.append)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    text = json.dumps(results)
    assert "llava-1.5" in text and "blip2" in text
    report = (tmp_path / "out" / "report.md").read_text()
    assert "llava-1.5" in report and "blip2" in report
    assert any("evaluating checkpoint" in line for line in said)
    # a second run reuses the stored results; a changed checkpoint would be evaluated afresh
    said.clear()
    run_compare(config, say=said.append)
    assert any("reusing its results" in line for line in said)


def test_checkpoint_runs_take_no_training_settings(tmp_path):
    with pytest.raises(ValueError, match="evaluates checkpoint"):
        RunSpec(name="x", checkpoint=str(tmp_path), stage2_steps=10)
    with pytest.raises(ValueError, match="needs an assembly"):
        RunSpec(name="x")
    with pytest.raises(ValueError, match="stage2_steps must be at least 1"):
        RunSpec(name="x", assembly="tiny-mlp-opt")
    with pytest.raises(ValueError, match="neither they nor the comparison give stage2_data"):
        CompareConfig(name="c", runs=[RunSpec(name="x", assembly="tiny-mlp-opt", stage2_steps=1)], output_dir=str(tmp_path),
                      evals=[EvalSet(name="val", captions="captions.json", tasks=["caption"])])
