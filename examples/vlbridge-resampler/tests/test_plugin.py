"""The plugin's own tests: what a plugin author would run in CI."""

from PIL import Image

import vlbridge
from vlbridge.plugintest.check import check_plugin


def test_plugin_declarations_are_valid():
    specs = check_plugin("vlbridge_resampler.plugin")  # also builds it and calls what vlbridge calls
    assert [s.name for s in specs] == ["resampler"]


def test_usable_in_an_assembly():
    assembly = vlbridge.load_assembly({
        "name": "eva-resampler-opt",
        "encoder": {"use": "eva-vit-g"},
        "connector": {"use": "resampler", "options": {"num_latents": 48}},
        "llm": {"use": "opt", "options": {"variant": "1.3b"}},
    })
    assert assembly.plan.connector_out.num_tokens == 48
    assert assembly.plan.connector_out.width == 2048


def test_builds_and_captions_with_tiny_parts():
    """The resampler has no set_stage: it trains in stage 2, every parameter (vlbridge's default)."""
    model = vlbridge.build({
        "name": "tiny-resampler",
        "encoder": {"use": "eva-vit-g", "options": {"variant": "tiny"}},
        "connector": {"use": "resampler", "options": {"num_latents": 8, "width": 32, "heads": 4, "depth": 1}},
        "llm": {"use": "opt", "options": {"variant": "tiny"}},
    })
    assert model.num_parameters(trainable=True) == model.plan.trainable_params[2]
    assert len(model.caption(Image.new("RGB", (16, 16), "red"), num_beams=2, max_new_tokens=3)) == 1
