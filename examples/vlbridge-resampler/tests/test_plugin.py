"""The plugin's own tests: what a plugin author would run in CI."""

import vlbridge
from vlbridge.testing import check_plugin


def test_plugin_declarations_are_valid():
    specs = check_plugin("vlbridge_resampler.plugin")
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
