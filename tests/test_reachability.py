"""Every part's weights are checked before anything is built (vlbridge.assemblies.reachability): a missing
part is named with the option that supplies it, and a real-size frozen part never becomes random
silently. No test touches the network: HF_HUB_OFFLINE=1 and an empty HF cache, or a refused probe."""

from __future__ import annotations

import socket
from dataclasses import replace

import huggingface_hub.constants
import pytest
from PIL import Image
from pydantic import Field

import vlbridge
from vlbridge.modeling import factory
from vlbridge.assemblies import reachability
from vlbridge.cli.main import main
from vlbridge.assemblies.reachability import UnreachableWeightsError, check_reachable
from vlbridge.errors import PluginError
from vlbridge.plugin import sources
from tests import fake_plugins as fake


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub, and a local HF cache that holds nothing (unless a test puts something there)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"


@pytest.fixture
def nothing_built(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a part was built before the reachability check refused")
    monkeypatch.setattr(factory, "_build_frozen", refuse)


def test_blip2_offline_names_every_missing_part_before_building(offline, nothing_built):
    with pytest.raises(UnreachableWeightsError) as caught:
        vlbridge.build("blip2-opt-2.7b")
    message = str(caught.value)
    assert "encoder eva-vit-g (weights): encoder.options.pretrained is not set, so this real-size frozen part would get random weights" in message
    assert "--random-weights" in message
    assert ("llm opt (weights): hub model 'facebook/opt-2.7b' (the default of llm.options.model) is not in the local "
            "Hugging Face cache and HF_HUB_OFFLINE is set; set llm.options.model to a local directory") in message


def test_random_weights_on_request_still_needs_the_llm(offline, nothing_built):
    with pytest.raises(UnreachableWeightsError) as caught:
        vlbridge.build("blip2-opt-2.7b", random_weights=True)
    assert "eva-vit-g" not in str(caught.value) and "facebook/opt-2.7b" in str(caught.value)


def test_stage1_needs_the_qformer_tokenizer_but_no_llm(offline):
    assembly = vlbridge.load_assembly("blip2-opt-2.7b")
    with pytest.raises(UnreachableWeightsError) as caught:
        check_reachable(assembly, 1, random_weights=True)
    assert "connector qformer (tokenizer): hub model 'bert-base-uncased'" in str(caught.value)
    assert "llm" not in str(caught.value)
    check_reachable(assembly, 2, random_weights=True, only=("encoder",))  # cache-features' question: the encoder alone


def test_a_cached_hub_model_is_reachable_offline(offline):
    snapshot = offline / "models--facebook--opt-2.7b" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"")
    (offline / "models--facebook--opt-2.7b" / "refs").mkdir()
    (offline / "models--facebook--opt-2.7b" / "refs" / "main").write_text("abc", encoding="utf-8")
    check_reachable(vlbridge.load_assembly("blip2-opt-2.7b"), 2, random_weights=True)


def test_a_missing_local_path_is_named(offline, tmp_path):
    body = {"name": "local", "encoder": {"use": "eva-vit-g", "options": {"variant": "tiny", "pretrained": str(tmp_path / "vit")}},
            "connector": {"use": "linear"}, "llm": {"use": "opt", "options": {"variant": "tiny"}}}
    with pytest.raises(UnreachableWeightsError, match=r"encoder.options.pretrained '.*vit' does not exist; set encoder.options.pretrained to"):
        check_reachable(vlbridge.load_assembly(body), 2)


@pytest.mark.parametrize("preset", ["tiny-qformer-opt", "tiny-mlp-opt", "tiny-qformer-flan-t5", "world-qformer-opt"])
def test_tiny_and_shipped_parts_pass(offline, preset):
    check_reachable(vlbridge.load_assembly(preset), 2)
    check_reachable(vlbridge.load_assembly(preset), 1)


def test_online_without_network_is_found_by_one_short_probe(monkeypatch, offline):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    reachability._probe.cache_clear()
    calls = []

    def no_network(address, timeout):
        calls.append((address, timeout))
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    try:
        with pytest.raises(UnreachableWeightsError, match=r"huggingface.co cannot be reached \(OSError: Network is unreachable"):
            check_reachable(vlbridge.load_assembly("blip2-opt-2.7b"), 2, random_weights=True)
    finally:
        reachability._probe.cache_clear()
    assert calls == [(("huggingface.co", 443), reachability.PROBE_SECONDS)]


def test_cli_caption_offline_exits_2_before_building(capsys, offline, nothing_built, tmp_path):
    image = tmp_path / "i.png"
    Image.new("RGB", (8, 8)).save(image)
    code = main(["caption", "-a", "blip2-opt-2.7b", str(image)])
    err = capsys.readouterr().err
    assert code == 2 and "cannot build blip2-opt-2.7b: nothing was loaded" in err and "internal error" not in err


class PatchesOptions(vlbridge.Options):
    checkpoint: str | None = Field(None, description="the patch encoder's weights file; none = random (it is small)")


def patches_sources(opts: PatchesOptions, stage: int) -> list[sources.WeightSource]:
    return sources.file_or_random("checkpoint", opts.checkpoint, "a .safetensors file of the patch encoder", random_by_design=True)


def third_party_assembly(checkpoint: str, declared: bool = True) -> vlbridge.Assembly:
    spec = replace(fake.plain_encoder_spec(), options=PatchesOptions, weight_sources=patches_sources if declared else None)
    body = {"name": "patches", "encoder": {"use": "patches", "options": {"checkpoint": checkpoint}},
            "connector": {"use": "linear"}, "llm": {"use": "opt", "options": {"variant": "tiny"}}}
    return vlbridge.load_assembly(body, registry=fake.registry(patches=fake.plugin("patches", encoders=[spec])))


def test_a_third_party_plugin_declaring_a_missing_file_is_refused_with_its_option(offline, tmp_path):
    missing = str(tmp_path / "patches.safetensors")
    with pytest.raises(UnreachableWeightsError) as caught:
        check_reachable(third_party_assembly(missing), 2)
    assert (f"encoder patches (weights): encoder.options.checkpoint {missing!r} does not exist; "
            "set encoder.options.checkpoint to a .safetensors file of the patch encoder") in str(caught.value)
    check_reachable(third_party_assembly(missing, declared=False), 2)  # declares nothing: nothing to check


def test_a_third_party_plugins_malformed_declaration_blames_the_plugin(offline):
    assembly = third_party_assembly("x")
    broken = replace(assembly.encoder, spec=replace(assembly.encoder.spec, weight_sources=lambda opts, stage: ["x"]))
    with pytest.raises(PluginError, match=r"encoder 'patches' \(plugin vlbridge-patches\): weight_sources\(\) returned a str"):
        check_reachable(replace(assembly, encoder=broken), 2)


def test_an_open_clip_tag_is_looked_for_in_its_hub_repository(offline):
    def check(tag: str) -> str:
        body = {"name": "tag", "encoder": {"use": "open-clip", "options": {"arch": "ViT-B-32", "pretrained": tag}},
                "connector": {"use": "linear"}, "llm": {"use": "opt", "options": {"variant": "tiny"}}}
        with pytest.raises(UnreachableWeightsError) as caught:
            check_reachable(vlbridge.load_assembly(body), 2)
        return str(caught.value)

    assert ("encoder open-clip (weights): open_clip weights 'ViT-B-32/openai' (encoder.options.pretrained) is not in the "
            "local Hugging Face cache and HF_HUB_OFFLINE is set") in check("openai")
    assert "encoder.options.pretrained 'no-such-tag' does not exist; set encoder.options.pretrained to a local open_clip" in check("no-such-tag")
