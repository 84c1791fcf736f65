"""An LLM plugin that has exactly the members docs/writing-plugins.md lists (section 5.4), and no
`tokenizer` or `model` attribute (a hand-written LLM), works wherever vlbridge uses an LLM."""

from __future__ import annotations

import pytest

import vlbridge
from tests import fake_plugins as fake
from vlbridge.plugintest.check import using_registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def model():
    plugin = fake.plugin("plain-llm", llms=[fake.tiny_opt_spec("build_interface_only_llm", "plain-llm")])
    with using_registry(fake.registry(plain=plugin)):
        built = vlbridge.build(fake.assembly(connector="linear", llm="plain-llm"))
        assert not hasattr(built.llm, "tokenizer")
        yield built


def test_compare_measures_the_llm_cost_of_a_plugin_llm(model):
    from vlbridge.compare.runner import llm_cost

    cost = llm_cost(model, batch=2, text_tokens=4, reps=1)
    assert cost["visual_tokens"] == model.plan.connector_out.num_tokens and cost["llm_forward_ms"] > 0


@pytest.mark.parametrize("target", ["llm", "vocabulary"])
def test_soft_prompt_norm_names_what_a_plugin_llm_lacks(model, target):
    import torch

    from vlbridge import PluginError
    from vlbridge.train.soft_prompt_scale import scale_soft_prompt

    image_embeds = torch.zeros(1, model.plan.encoder_out.num_tokens, model.plan.encoder_out.width)
    with pytest.raises(PluginError, match=r"llm 'plain-llm' \(plugin vlbridge-plain\): its module \(InterfaceOnly\) "
                                          r"lacks tokenizer, embed_tokens; soft_prompt_norm: .*use soft_prompt_norm: init"):
        scale_soft_prompt(model, image_embeds, None, ["a red square"], target)


def test_a_generate_that_returns_the_prompt_too_is_refused():
    from PIL import Image

    from vlbridge import PluginError
    from vlbridge.plugintest.check import check_plugin

    plugin = fake.plugin("echo", llms=[fake.tiny_opt_spec("build_prompt_echo_llm", "echo")])
    with pytest.raises(PluginError, match=r"generate returned \d+ tokens per row for max_new_tokens=3; it must return "
                                          r"the new token ids only"):
        check_plugin(plugin)
    with using_registry(fake.registry(echo=plugin)):
        model = vlbridge.build(fake.assembly(connector="linear", llm="echo"))
        with pytest.raises(PluginError, match=r"llm 'echo' \(plugin vlbridge-echo\): generate returned \d+ tokens per row"):
            model.answer(Image.new("RGB", (28, 28)), "what colour is the square?", num_beams=1, max_new_tokens=3)


@pytest.mark.parametrize("loss_average", ["tokens", "samples"])
def test_logits_that_leave_out_the_visual_positions_are_named(loss_average):
    import torch

    from vlbridge import VLBridgeError
    from vlbridge.plugintest.check import check_plugin
    from vlbridge.train.objectives import Stage2Objective

    plugin = fake.plugin("text-logits", llms=[fake.tiny_opt_spec("build_text_logits_llm", "text-logits")])
    expected = r"logits of shape \(2, \d+, \d+\) for \d+ visual and \d+ text tokens; a decoder-only LLM's logits must cover \[visual; text\]"
    with pytest.raises(VLBridgeError, match=expected):
        check_plugin(plugin)
    with using_registry(fake.registry(text=plugin)):
        model = vlbridge.build(fake.assembly(connector="linear", llm="text-logits"))
        image_embeds = torch.zeros(2, model.plan.encoder_out.num_tokens, model.plan.encoder_out.width)
        with pytest.raises(VLBridgeError, match=expected):  # loss_average samples read them as [visual; text]: a shape error naming nothing
            Stage2Objective(loss_average=loss_average)(model, {"text": ["a red square", "a blue circle"], "image_embeds": image_embeds})
