"""A connector written from the plugin guide (a plain nn.Module, no set_stage) builds, captions,
answers, trains in stage 2, round-trips a checkpoint, and works from the CLI; stage 1 is refused
with a message that names the plugin and what its module lacks."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image

import vlbridge
import vlbridge.train
from tests import fake_plugins as fake
from tests.test_trainer_samples import config, train_losses, write_caption_data
from vlbridge import PluginError, VLBridgeError
from vlbridge.cli.main import main
from vlbridge.plugintest.check import using_registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RED = Image.new("RGB", (32, 32), (220, 20, 20))


@pytest.fixture
def pool_registry():
    with using_registry(fake.registry(pool=fake.connector_plugin())) as registry:
        yield registry


def test_plain_module_builds_captions_answers_and_round_trips(tmp_path, pool_registry):
    model = vlbridge.build(fake.assembly())
    assert model.stage == 2 and not hasattr(model.connector, "set_stage")
    assert model.num_parameters(trainable=True) == model.plan.trainable_params[2]  # every connector parameter
    assert all(not p.requires_grad for p in [*model.encoder.parameters(), *model.llm.parameters()])
    model.set_stage(2)
    assert len(model.caption([RED, RED], num_beams=2, max_new_tokens=3)) == 2
    assert len(model.answer(RED, "what colour?", max_new_tokens=3)) == 1
    with torch.no_grad():
        model.connector.proj.weight.add_(0.5)
    loaded = vlbridge.load(model.save(tmp_path / "ckpt"))
    assert torch.equal(loaded.connector.proj.weight, model.connector.proj.weight)
    assert loaded.caption(RED, num_beams=1, max_new_tokens=3) == model.caption(RED, num_beams=1, max_new_tokens=3)


def test_plain_module_trains_in_stage_2_and_captions_from_the_cli(tmp_path, pool_registry, capsys):
    data = write_caption_data(tmp_path / "data")
    run = config(data, tmp_path / "run", assembly=fake.assembly(), stage=2, steps=8, log_every=2, optimizer={"lr": 3e-3})
    result = vlbridge.train.run(run)
    losses = train_losses(tmp_path / "run")
    assert set(result.train) >= {"loss", "lm"} and losses[-1] < losses[0]
    image = data / "images" / "0.png"
    code = main(["caption", "--checkpoint", str(result.checkpoint), "--max-new-tokens", "3", "--num-beams", "2", "--json", str(image)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)[0]["image"] == str(image)


def test_vlbridge_train_cli_trains_a_plain_connector(tmp_path, pool_registry, capsys):
    data = write_caption_data(tmp_path / "data", images=8)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config(data, tmp_path / "run", assembly=fake.assembly(), stage=2, steps=3)), encoding="utf-8")
    code = main(["train", str(path)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "internal error" not in err and (tmp_path / "run" / "checkpoints").is_dir()


def test_stage_1_of_a_plain_connector_names_what_it_lacks(pool_registry):
    with using_registry(fake.registry(pool=fake.connector_plugin(stages=(1, 2)))):
        with pytest.raises(PluginError) as err:
            vlbridge.build(fake.assembly(), stage=1)
        message = str(err.value)
        assert "connector 'pool' (plugin vlbridge-pool) cannot train in stage 1" in message
        assert "lacks set_stage, tokenizer, image_context, query_outputs" in message
        model = vlbridge.build(fake.assembly())  # stage 2 still works
        with pytest.raises(PluginError, match="lacks set_stage"):
            model.set_stage(1)
        assert model.stage == 2


def test_stage_1_with_set_stage_but_no_interface_names_the_missing_methods():
    with using_registry(fake.registry(half=fake.connector_plugin("build_with_set_stage", name="half", stages=(1, 2)))):
        with pytest.raises(PluginError) as err:
            vlbridge.build(fake.assembly("half"), stage=1)
    message = str(err.value)
    assert "connector 'half' (plugin vlbridge-half)" in message and "set_stage," not in message
    assert ("lacks tokenizer, image_context, query_outputs, image_features_of, text_features, itm_logits, "
            "itg_logits_from_queries, temp") in message


def test_a_connector_with_only_stage_2_still_refuses_stage_1_by_its_spec(pool_registry):
    with pytest.raises(VLBridgeError, match=r"supports stages \[2\], not stage 1"):
        vlbridge.build(fake.assembly(), stage=1)


def test_a_plain_encoder_without_preprocess_attribute_captions():
    encoder = fake.plugin("patches", encoders=[fake.plain_encoder_spec()])
    with using_registry(fake.registry(patches=encoder, pool=fake.connector_plugin())):
        model = vlbridge.build(fake.assembly(encoder="patches"))
        assert not hasattr(model.encoder, "preprocess") and not any(p.requires_grad for p in model.encoder.parameters())
        assert len(model.caption(RED, num_beams=1, max_new_tokens=2)) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_plain_module_runs_in_the_dtype_the_model_is_converted_to(pool_registry, dtype):
    """model.to(dtype) / .half(): the encoder's fp32 tokens reach the plugin's layers in their dtype (the
    guide's connector does not cast its input), instead of a dtype mismatch inside the plugin."""
    model = vlbridge.build(fake.assembly()).to(dtype)
    assert model.connector_dtype == dtype
    tokens = model.visual_tokens(model.pixel_values([RED]))
    assert tokens.dtype == dtype
    assert len(model.caption(RED, num_beams=1, max_new_tokens=3)) == 1
