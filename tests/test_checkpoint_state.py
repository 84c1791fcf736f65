"""A checkpoint keeps the connector's whole state: `save` -> `load` gives the same outputs for every
method the model offers, and a checkpoint that truly lacks a part (one written before whole-state
checkpoints, or an import without heads) refuses what needs that part instead of using random weights."""

from __future__ import annotations

import fnmatch
import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vlbridge
import vlbridge.train
from tests.test_trainer_samples import config, write_caption_data
from vlbridge.files.checkpoint import write_checkpoint
from vlbridge.errors import MissingWeightsError
from vlbridge.modeling.model import VLBridgeModel
from vlbridge.plugins.connectors.qformer_model import FROZEN_IN_STAGE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGES = [Image.new("RGB", (40, 40), (220, 20, 20)), Image.new("RGB", (40, 40), (20, 20, 220))]
TEXTS = ["a red square", "a blue square", "a cat"]
STAGE2_ONLY = FROZEN_IN_STAGE[2]  # what an old stage-2 checkpoint left out: the text side and the stage-1 heads
GEN = {"num_beams": 2, "max_new_tokens": 3}


def outputs(model: VLBridgeModel) -> dict[str, object]:
    """What every output-giving method of the model returns on fixed inputs."""
    pixels = model.pixel_values(IMAGES)
    ids, mask = model.llm.tokenize(["a photo of"] * 2)
    retrieval = model.retrieve(IMAGES, TEXTS, k=2)
    with torch.no_grad():
        logits = model(pixels, ids, mask).logits
        tokens = model.visual_tokens(pixels)
    return {
        "forward": logits, "visual_tokens": tokens, "encode_images": model.encode_images(pixels),
        "caption": model.caption(IMAGES, **GEN), "generate": model.generate(IMAGES, "a", max_new_tokens=3),
        "answer": model.answer(IMAGES, "what colour?", **GEN),
        "features": [vars(model.features(images=IMAGES, texts=texts, mode=mode))
                     for mode, texts in (("image", None), ("text", TEXTS[:2]), ("multimodal", TEXTS[:2]))],
        "retrieve": vars(retrieval),
    }


def assert_same(got: object, want: object, where: str = "outputs") -> None:
    """Equal to the bit: tensors by torch.equal, containers item by item, the rest by ==."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), where
        for key in want:
            assert_same(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert got == want, where


# Methods of VLBridgeModel that give no output of their own to compare (bookkeeping, saving).
NOT_OUTPUTS = {"set_stage", "trainable_parameters", "num_parameters", "save", "pixel_values", "merged_llm_model",
               "plan", "device", "connector_dtype", "encoder_trains", "train"}  # train: nn.Module's mode switch, keeping frozen parts in eval


def test_outputs_cover_every_public_method():
    public = {name for name in vars(VLBridgeModel) if not name.startswith("_")}
    model_outputs = {"forward", "visual_tokens", "encode_images", "caption", "generate", "answer", "features", "retrieve"}
    assert public - NOT_OUTPUTS == model_outputs  # a new method needs a row in `outputs`


def scrambled(preset: str) -> VLBridgeModel:
    """A built model whose every connector tensor differs from what any build draws (as after training)."""
    model = vlbridge.build(preset)
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for param in model.connector.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def test_save_then_load_gives_the_same_outputs_for_every_method(tmp_path):
    model = scrambled("tiny-qformer-opt")
    loaded = vlbridge.load(model.save(tmp_path / "ckpt"))
    saved, again = model.connector.state_dict(), loaded.connector.state_dict()
    assert [name for name in saved if not torch.equal(saved[name], again[name])] == []
    assert_same(outputs(loaded), outputs(model))
    meta = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
    assert meta["connector"]["absent"] == [] and meta["tensors"] == len(saved)


def old_stage2_checkpoint(model: VLBridgeModel, out) -> None:
    """What save() wrote before whole-state checkpoints: stage 2's trainable tensors only."""
    tensors = {name: p.detach() for name, p in model.connector.named_parameters() if p.requires_grad}
    write_checkpoint(out, model.assembly.config.model_dump(mode="json"), tensors, 2)
    meta = json.loads((out / "checkpoint.json").read_text())
    assert "connector" not in meta  # as old checkpoints are: no manifest


def test_a_checkpoint_lacking_the_heads_refuses_what_needs_them(tmp_path):
    model = scrambled("tiny-qformer-opt")
    old_stage2_checkpoint(model, tmp_path / "old")
    loaded = vlbridge.load(tmp_path / "old")
    assert loaded.caption(IMAGES, **GEN) == model.caption(IMAGES, **GEN)  # what it holds still works
    with pytest.raises(MissingWeightsError, match=r"vision_proj has no weights.*lacks vision_proj.bias, vision_proj.weight.*train in stage 1"):
        loaded.retrieve(IMAGES, TEXTS)
    with pytest.raises(MissingWeightsError, match=r"embeddings.word.*embeddings.word.weight"):
        loaded.features(texts=TEXTS, mode="text")
    # saved again, it stays a checkpoint without them: the manifest names them, nothing random comes back
    resaved = vlbridge.load(loaded.save(tmp_path / "again"))
    absent = json.loads((tmp_path / "again" / "checkpoint.json").read_text())["connector"]["absent"]
    assert "itm_head.weight" in absent and "embeddings.word.weight" in absent and "proj.weight" not in absent
    with pytest.raises(MissingWeightsError, match=r"again lacks vision_proj.bias, vision_proj.weight"):
        resaved.retrieve(IMAGES, TEXTS)
    torch.testing.assert_close(resaved.visual_tokens(resaved.pixel_values(IMAGES)), model.visual_tokens(model.pixel_values(IMAGES)))


def test_only_what_needs_the_missing_part_refuses(tmp_path):
    """An import without an ITM head (as transformers' BLIP-2 has none): ITC features work, ITM re-ranking refuses."""
    model = scrambled("tiny-qformer-opt")
    tensors = {name: t for name, t in model.connector.state_dict().items() if not name.startswith("itm_head.")}
    write_checkpoint(tmp_path / "import", model.assembly.config.model_dump(mode="json"), tensors, 1,
                     {"allow_missing": ["itm_head.*"]})
    loaded = vlbridge.load(tmp_path / "import")
    assert_same(vars(loaded.features(images=IMAGES, texts=TEXTS[:2], mode="multimodal")),
                vars(model.features(images=IMAGES, texts=TEXTS[:2], mode="multimodal")))
    assert_same(vars(loaded.features(texts=TEXTS, mode="text")), vars(model.features(texts=TEXTS, mode="text")))
    with pytest.raises(MissingWeightsError, match=r"itm_head has no weights.*lacks itm_head.bias, itm_head.weight"):
        loaded.retrieve(IMAGES, TEXTS)


def test_a_manifest_that_disagrees_with_its_file_is_refused(tmp_path):
    model = vlbridge.build("tiny-qformer-opt")
    out = model.save(tmp_path / "ckpt")
    meta = json.loads((out / "checkpoint.json").read_text())
    meta["connector"]["absent"] = ["itm_head.weight"]  # but the file holds it
    (out / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(vlbridge.WeightsError, match=r"lists itm_head.weight as absent.*holds it"):
        vlbridge.load(out)


# -- the trainer's checkpoints ---------------------------------------------------------------------
def train(data, out, **overrides) -> Path:
    """A short run of the tiny Q-Former (the stage-1 default of the trainer tests); its last checkpoint."""
    return vlbridge.train.run(config(data, out, steps=2, log_every=2, schedule={"warmup_steps": 1}, **overrides)).checkpoint


def test_stage2_checkpoints_carry_the_stage1_heads(tmp_path):
    data = write_caption_data(tmp_path / "data", images=8)
    stage1 = train(data, tmp_path / "s1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", vlbridge.UntrainedWarning)  # the run trains what stage 1 left as built
        stage2 = train(data, tmp_path / "s2", stage=2, init_from=str(tmp_path / "s1"), prompt="a photo of")
    first, final = load_file(stage1 / "connector.safetensors"), load_file(stage2 / "connector.safetensors")
    heads = [name for name in first if any(fnmatch.fnmatchcase(name, p) for p in STAGE2_ONLY)]
    assert heads and all(torch.equal(final[name], first[name]) for name in heads)
    # retrieval on the final checkpoint = the stage-1 model with what stage 2 trained put in
    expected = vlbridge.load(stage1, stage=2)
    trained = {name for name, p in expected.connector.named_parameters() if p.requires_grad}
    expected.connector.load_state_dict({name: final[name] for name in trained}, strict=False)
    assert_same(vars(vlbridge.load(stage2).retrieve(IMAGES, TEXTS, k=2)), vars(expected.retrieve(IMAGES, TEXTS, k=2)))


def test_training_fills_absent_tensors_and_keeps_the_rest_absent(tmp_path):
    data = write_caption_data(tmp_path / "data", images=8)
    old_stage2_checkpoint(scrambled("tiny-qformer-opt"), tmp_path / "old")
    stage2 = train(data, tmp_path / "s2", stage=2, init_from=str(tmp_path / "old"), prompt="a photo of")
    absent = json.loads((stage2 / "checkpoint.json").read_text())["connector"]["absent"]
    assert "itm_head.weight" in absent and "proj.weight" not in absent  # stage 2 trained proj, not the heads
    with pytest.raises(MissingWeightsError, match="itm_head"):
        vlbridge.load(stage2).connector.itm_head(torch.zeros(1, 64))
    stage1 = train(data, tmp_path / "s1", init_from=str(tmp_path / "old"))  # stage 1 trains them all
    assert json.loads((stage1 / "checkpoint.json").read_text())["connector"]["absent"] == []
    assert vlbridge.load(stage1).retrieve(IMAGES, TEXTS, k=2).i2t.shape == (2, 3)


def test_a_stage1_checkpoint_loaded_for_stage2_warns_that_its_projection_is_untrained(tmp_path):
    """`vlbridge.load(stage1, stage=2)` builds the LLM side (a stage-2 run starts so) and captioned
    through the projection as it was built, without a word."""
    stage1 = tmp_path / "s1"
    vlbridge.build("tiny-qformer-opt", stage=1).save(stage1)
    with pytest.warns(vlbridge.UntrainedWarning, match=r"s1 is a stage-1 checkpoint loaded for stage 2: proj\.bias, proj\.weight "
                                                        r"train only in stage 2, so they hold the values they were built with"):
        vlbridge.load(stage1, stage=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", vlbridge.UntrainedWarning)
        vlbridge.load(stage1)  # its own stage: nothing untrained is used
    assert json.loads((stage1 / "checkpoint.json").read_text())["trained_stages"] == [1]


def test_build_with_a_stage1_checkpoint_as_weights_for_stage2_warns_too(tmp_path):
    """`build(assembly, stage=2, weights=stage1_dir)` loaded the same untrained projection as `load`
    and said nothing; a stage-2 checkpoint has trained it, and a bare file records no stage."""
    stage1 = vlbridge.build("tiny-qformer-opt", stage=1).save(tmp_path / "s1")
    with pytest.warns(vlbridge.UntrainedWarning, match=r"s1 is a stage-1 checkpoint loaded for stage 2: proj\.bias, proj\.weight "
                                                        r"train only in stage 2") as caught:
        vlbridge.build("tiny-qformer-opt", stage=2, weights=stage1)
    assert [Path(w.filename).name for w in caught] == [Path(__file__).name]  # the caller's line, not vlbridge's
    stage2 = vlbridge.build("tiny-qformer-opt", stage=2).save(tmp_path / "s2")
    with warnings.catch_warnings():
        warnings.simplefilter("error", vlbridge.UntrainedWarning)
        vlbridge.build("tiny-qformer-opt", stage=2, weights=stage2)
        vlbridge.build("tiny-qformer-opt", stage=2, weights=stage1 / "connector.safetensors")  # nothing known of its stage


def test_the_cli_warns_of_a_stage1_checkpoint_given_as_weights(tmp_path, capsys):
    from vlbridge.cli.main import main

    stage1 = vlbridge.build("tiny-qformer-opt", stage=1).save(tmp_path / "s1")
    image = tmp_path / "red.png"
    Image.new("RGB", (8, 8), "red").save(image)
    assert main(["caption", "--assembly", "tiny-qformer-opt", "--weights", str(stage1), "--num-beams", "1",
                 "--max-new-tokens", "2", str(image)]) == 0
    err = capsys.readouterr().err
    assert err.count(f"vlbridge caption: warning: {stage1} is a stage-1 checkpoint loaded for stage 2: proj.bias, proj.weight "
                     "train only in stage 2") == 1
    assert "UntrainedWarning" not in err


def test_a_stage1_run_started_from_a_stage2_checkpoint_keeps_its_trained_projection_unwarned(tmp_path):
    """Its checkpoint says stage 1, but its projection went through stage 2 before: no false alarm."""
    data = write_caption_data(tmp_path / "data", images=4)
    vlbridge.build("tiny-qformer-opt", stage=2).save(tmp_path / "s2")
    stage1 = train(data, tmp_path / "s1", init_from=str(tmp_path / "s2"))
    meta = json.loads((stage1 / "checkpoint.json").read_text())
    assert meta["stage"] == 1 and meta["trained_stages"] == [1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error", vlbridge.UntrainedWarning)
        model = vlbridge.load(stage1, stage=2)
    assert model.trained_stages == (1, 2)
    again = model.save(tmp_path / "again")  # carried forward through a save
    assert json.loads((again / "checkpoint.json").read_text())["trained_stages"] == [1, 2]


def test_an_older_checkpoint_without_trained_stages_loads_and_still_warns(tmp_path):
    stage1 = vlbridge.build("tiny-qformer-opt", stage=1).save(tmp_path / "s1")
    meta = json.loads((stage1 / "checkpoint.json").read_text())
    del meta["trained_stages"]
    (stage1 / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.warns(vlbridge.UntrainedWarning, match=r"proj\.bias, proj\.weight train only in stage 2.*unless its run started "
                                                        r"from a stage-2 checkpoint"):
        model = vlbridge.load(stage1, stage=2)
    assert model.trained_stages == (1,)  # its own stage is all that is known


def test_a_trained_stages_list_without_its_own_stage_is_refused(tmp_path):
    stage1 = vlbridge.build("tiny-qformer-opt", stage=1).save(tmp_path / "s1")
    meta = json.loads((stage1 / "checkpoint.json").read_text())
    (stage1 / "checkpoint.json").write_text(json.dumps({**meta, "trained_stages": [2]}))
    with pytest.raises(vlbridge.WeightsError, match=r"'trained_stages' must list .* its own stage 1 among them; found \[2\]"):
        vlbridge.load(stage1)
