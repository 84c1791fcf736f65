"""The shared-prompt beam cache (plugins/llms/beam_cache.py): the same keys and values as
transformers' DynamicLayer after any updates and reorders, and the same generated tokens."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer  # noqa: E402

from vlbridge.plugins.llms import beam_cache  # noqa: E402
from vlbridge.plugin.registry import get_registry  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _layers(images: int = 2, group: int = 3, prompt: int = 5, capacity: int = 2, value_width: int = 8):
    """A DynamicLayer holding each image's prompt once per beam, and the shared-prompt layer of the same prompt."""
    torch.manual_seed(0)
    keys, values = torch.randn(images, 4, prompt, 8), torch.randn(images, 4, prompt, value_width)
    plain = DynamicLayer()
    plain.update(keys.repeat_interleave(group, dim=0), values.repeat_interleave(group, dim=0))
    return plain, beam_cache.SharedPromptLayer(keys, values, beam_cache.BeamGroups(group), capacity)


def _same(plain, shared) -> None:
    assert shared.get_seq_length() == plain.get_seq_length()
    assert torch.equal(shared.keys, plain.keys) and torch.equal(shared.values, plain.values)


@pytest.mark.parametrize("value_width", [8, 4])  # 4: values narrower than keys, as multi-head latent attention's (DeepSeek-V2/V3)
def test_updates_and_reorders_equal_a_dynamic_layer(value_width):
    plain, shared = _layers(capacity=2, value_width=value_width)  # the third new position outgrows the buffers
    within = torch.tensor([2, 2, 0, 4, 3, 3])  # every beam stays with its image: the prompt is not copied
    across = torch.tensor([3, 0, 1, 5, 4, 2])
    for step, order in enumerate((within, within, across, within)):
        new_k, new_v = torch.randn(6, 4, 1, 8), torch.randn(6, 4, 1, value_width)
        out = shared.update(new_k, new_v)
        plain.update(new_k, new_v)
        assert torch.equal(out[0], plain.keys)
        plain.reorder_cache(order)
        shared.reorder_cache(order)
        _same(plain, shared)
    assert shared.get_seq_length() == 5 + 4


def test_crop_and_batch_changes_equal_a_dynamic_layer():
    plain, shared = _layers()
    for layer in (plain, shared):
        layer.update(torch.ones(6, 4, 2, 8), torch.ones(6, 4, 2, 8))
        layer.crop(-3)  # into the prompt
        layer.batch_repeat_interleave(2)
        layer.reorder_cache(torch.arange(12).flip(0))
        layer.update(torch.zeros(12, 4, 1, 8), torch.zeros(12, 4, 1, 8))
    _same(plain, shared)


def test_only_a_cache_of_plain_dynamic_layers_is_converted():
    keys = torch.randn(1, 2, 3, 4)
    plain = DynamicCache()
    plain.update(keys, keys, 0)
    assert beam_cache.share_prompt(plain, 2, 4) and isinstance(plain.layers[0], beam_cache.SharedPromptLayer)
    sliding = DynamicCache()
    sliding.layers = [DynamicSlidingWindowLayer(sliding_window=8)]
    sliding.update(keys, keys, 0)
    assert not beam_cache.share_prompt(sliding, 2, 4) and type(sliding.layers[0]) is DynamicSlidingWindowLayer
    assert not beam_cache.share_prompt(DynamicCache(), 2, 4)  # nothing cached yet


def _tiny(name: str):
    """A tiny decoder-only LLM whose beams differ from token to token (wider random matrices)."""
    spec = get_registry().resolve("llm", name).spec
    torch.manual_seed(0)
    llm = spec.load_factory()(spec.options() if name == "hf-causal-lm" else spec.options(variant="tiny"))
    with torch.no_grad():
        for key, param in llm.model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.1 if "embed_tokens" in key else 0.3)
    return llm


@pytest.mark.parametrize("name", ["opt", "hf-causal-lm"])
@pytest.mark.parametrize("search", [{"num_beams": 3}, {"num_beams": 4, "num_return_sequences": 2, "length_penalty": 0.0},
                                    {"do_sample": True, "num_return_sequences": 3, "top_p": 0.9}])
def test_generation_equals_the_path_without_it(name, search, monkeypatch):
    llm = _tiny(name)
    torch.manual_seed(3)
    visual = torch.randn(2, 4, llm.embed_width)
    ids, mask = llm.tokenize(["a red circle", "two blue squares and a small star"], padding_side="left")
    settings = {"max_new_tokens": 6, "min_new_tokens": 6, **search}
    used = []
    share = beam_cache.share_prompt
    monkeypatch.setattr(beam_cache, "share_prompt", lambda *args: used.append(share(*args)) or used[-1])
    torch.manual_seed(4)
    ours = llm.generate(visual, ids, mask, **settings)
    monkeypatch.setattr(beam_cache, "share_prompt", lambda *args: False)
    torch.manual_seed(4)
    plain = llm.generate(visual, ids, mask, **settings)
    assert used == [True]
    assert torch.equal(ours, plain)
    assert len(set(ours.flatten().tolist())) > 3  # real sequences, not one token repeated
