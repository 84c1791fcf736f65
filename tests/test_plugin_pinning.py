"""What a checkpoint and a model do with third-party parts: a saved checkpoint names each plugin
part as `distribution:name` (so a second plugin claiming the name later cannot make it ambiguous),
frozen plain-module parts stay in eval mode while the connector trains, a stage the assembly cannot
build is explained, and VLBRIDGE_TRACE_PLUGINS prints the hook calls."""

from __future__ import annotations

import pytest
import torch
import yaml

import vlbridge
from tests import fake_plugins as fake
from vlbridge.errors import VLBridgeError
from vlbridge.plugintest.check import registry_with, using_registry


def test_a_saved_checkpoint_pins_its_plugin_parts_to_their_distribution(tmp_path):
    with using_registry(fake.registry(pool=fake.connector_plugin())):
        model = vlbridge.build(fake.assembly("pool"))
        model.save(tmp_path / "ckpt")
    saved = yaml.safe_load((tmp_path / "ckpt" / "assembly.yaml").read_text(encoding="utf-8"))
    assert saved["connector"]["use"] == "vlbridge-pool:pool"
    assert saved["encoder"]["use"] == "eva-vit-g" and saved["llm"]["use"] == "opt"  # built-ins stay plain
    assert not saved.get("requires")  # an in-process plugin is no pip distribution to require
    # later, a second plugin claims the name: the checkpoint still loads the part it was trained with
    both = registry_with({"vlbridge-pool": fake.connector_plugin(), "vlbridge-other": fake.connector_plugin()})
    with using_registry(both):
        with pytest.raises(vlbridge.AssemblyError, match="provided by several plugins"):
            vlbridge.load_assembly(fake.assembly("pool"))
        loaded = vlbridge.load(tmp_path / "ckpt")
    assert loaded.plan.connector.distribution == "vlbridge-pool"
    for key, value in model.connector.state_dict().items():
        assert torch.equal(loaded.connector.state_dict()[key], value)


def test_a_missing_provider_is_named_as_missing(tmp_path):
    with pytest.raises(vlbridge.AssemblyError, match=r"no installed plugin is called 'tp-pool'; install it \(pip install tp-pool\)"):
        vlbridge.load_assembly({**fake.assembly("pool"), "connector": {"use": "tp-pool:pool"}})


def test_plain_frozen_parts_stay_in_eval_mode_while_the_connector_trains():
    plugin = fake.plugin("patches", encoders=[fake.plain_encoder_spec()], connectors=[fake.connector_plugin().vlbridge_register_connectors()[0]])
    with using_registry(registry_with({"vlbridge-patches": plugin})):
        model = vlbridge.build(fake.assembly("pool", encoder="patches")).train()
    assert model.connector.training
    assert not model.encoder.training and not any(m.training for m in model.encoder.modules())
    assert not model.llm.training


def test_stage_2_of_an_assembly_without_an_llm_names_the_missing_llm():
    llm_free = {"name": "no-llm", "encoder": {"use": "eva-vit-g", "options": {"variant": "tiny"}},
                "connector": {"use": "qformer", "options": {"variant": "tiny"}}}
    with pytest.raises(VLBridgeError, match=r"stage 2 needs an LLM, and assembly 'no-llm' has no llm: slot .* add an llm:"):
        vlbridge.build(llm_free, stage=2)


def test_trace_prints_every_hook_call(monkeypatch, capsys):
    monkeypatch.setenv("VLBRIDGE_TRACE_PLUGINS", "1")
    registry_with({"vlbridge-pool": fake.connector_plugin()})
    err = capsys.readouterr().err
    assert "vlbridge plugins: vlbridge_register_connectors of vlbridge-pool (vlbridge-pool) returned [pool]" in err
    assert "vlbridge_register_encoders of vlbridge.plugins.encoders.eva_vit_g (vlbridge) returned [eva-vit-g]" in err
    monkeypatch.setenv("VLBRIDGE_TRACE_PLUGINS", "0")
    registry_with({})
    assert capsys.readouterr().err == ""


def test_a_wrong_declared_count_warns_at_build():
    """check_plugin fails it; a build (what a user of the plugin runs) warns, naming both numbers."""
    liar = fake.connector_plugin(name="counts", num_params=lambda o, e, w: {2: 7})
    with using_registry(fake.registry(counts=liar)):
        with pytest.warns(vlbridge.PluginWarning, match=r"num_params\(\) declares 7 trainable parameters in stage 2 but the module trains 4,160"):
            vlbridge.build(fake.assembly("counts"))
