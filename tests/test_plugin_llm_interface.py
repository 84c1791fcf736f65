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
