"""Generic causal LMs stop where transformers' generate stops for the same folder: at every eos id of
the folder's generation_config.json (a list for Llama-3 instruct, Qwen2 instruct, Gemma), padding
finished rows as transformers does (its pad_token_id, else the first eos id)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.hf_families import make_llm_dir
from vlbridge.errors import VLBridgeError
from vlbridge.plugins.llms.hf_causal_lm import HFCausalLMOptions
from vlbridge.plugins.llms.hf_causal_lm_model import build
from vlbridge.plugins.llms.stop_ids import as_id_list

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEXTS = ["a", "two blue squares and a small red circle"]


def _free_tokens(directory, family):
    """What the model generates greedily when nothing stops it, per row (to pick stop ids it really emits)."""
    llm = build(HFCausalLMOptions(model=str(directory)))
    torch.manual_seed(5)
    visual = torch.randn(2, 3, llm.embed_width)
    out = llm.generate(visual, *llm.tokenize(TEXTS, padding_side="left"), max_new_tokens=8, num_beams=1, eos_token_id=[])
    return visual, out.tolist()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def listed_stops(request, tmp_path_factory):
    """A tiny folder whose config.json names one eos id and whose generation_config.json lists three
    (none of them a pad: transformers then pads finished rows with the first), two of them tokens the
    model generates early, as Llama-3 instruct's list holds its end-of-turn token."""
    family = request.param
    directory = tmp_path_factory.mktemp(family) / family
    make_llm_dir(directory, family, pad=False)
    visual, free = _free_tokens(directory, family)
    llm = build(HFCausalLMOptions(model=str(directory)))
    first, second = free[0][2], free[1][4]
    stops = [s for s in dict.fromkeys([first, llm.tokenizer.eos_token_id, second])]
    settings = json.loads((directory / "generation_config.json").read_text())
    settings.update(eos_token_id=stops, pad_token_id=None)
    (directory / "generation_config.json").write_text(json.dumps(settings))
    return directory, visual, stops


def _reference(llm, visual, ids, mask, **settings):
    """transformers' own generate on the same left-packed prompt, with the folder's generation config."""
    embeds, attention = llm.visual_prompt(visual, ids, mask, "left")
    return llm.model.generate(inputs_embeds=embeds, attention_mask=attention, do_sample=False, **settings)


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("min_new_tokens", [0, 3])
def test_generation_stops_at_every_eos_id_of_the_folder_as_transformers(listed_stops, beams, min_new_tokens):
    directory, visual, stops = listed_stops
    llm = build(HFCausalLMOptions(model=str(directory)))
    assert llm.model.generation_config.eos_token_id == stops
    ids, mask = llm.tokenize(TEXTS, padding_side="left")
    settings = dict(max_new_tokens=8, num_beams=beams, min_new_tokens=min_new_tokens, length_penalty=0.5 if beams > 1 else 1.0)
    ours = llm.generate(visual, ids, mask, **settings)
    expected = _reference(llm, visual, ids, mask, **settings)
    assert ours.tolist() == expected.tolist()
    if beams == 1 and min_new_tokens == 0:
        assert ours.shape[1] < 8  # both rows stopped early, at listed ids that are not the tokenizer's eos
        rows = ours.tolist()
        ends = [next(k for k, t in enumerate(row) if t in stops) for row in rows]
        assert min(ends) < max(ends) and all(t == stops[0] for row, k in zip(rows, ends) for t in row[k + 1:])  # padded with the first


def test_the_caption_end_token_stops_generation_where_the_folder_lacks_it(listed_stops):
    directory, _, stops = listed_stops
    llm = build(HFCausalLMOptions(model=str(directory), eos_token="</s>"))
    end = llm.end_token_id
    assert llm.stop_token_ids == stops + ([end] if end not in stops else [])


def test_a_bad_eos_setting_is_refused_by_name():
    with pytest.raises(VLBridgeError, match=r"eos_token_id \[2, 'x'\] holds 'x'"):
        as_id_list([2, "x"], "generation_config.json")
    assert as_id_list(None, "x") == [] and as_id_list(7, "x") == [7]
