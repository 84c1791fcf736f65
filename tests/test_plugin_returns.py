"""What a plugin's module returns at run time is held to docs/writing-plugins.md where vlbridge
receives it: a wrong type or shape is a PluginError naming the component, the call and what it must
return (the CLI: exit 2, one paragraph), never an AttributeError deep inside training or generation.
The build's checks run one blank batch in eval mode; these faults get past them."""

from __future__ import annotations

import pytest
import torch
import yaml
from PIL import Image

import vlbridge
from tests import fake_plugins as fake
from tests.test_trainer_samples import config, write_caption_data
from vlbridge import PluginError
from vlbridge.cli.main import main
from vlbridge.plugintest.check import check_plugin, using_registry
from vlbridge.train.objectives import Stage2Objective

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LISTS = "llm 'lists' (plugin vlbridge-lists): tokenize(texts"
MUST_RETURN = "it must return (input_ids, attention_mask), two"


def llm_plugin(factory: str, name: str):
    return fake.plugin(name, llms=[fake.tiny_opt_spec(factory, name)])


def one_paragraph_error(code: int, err: str, command: str, *expected: str) -> None:
    assert code == 2, err
    assert "internal error" not in err and "Traceback" not in err, err
    last = err.rstrip("\n").rpartition("\n")[2]  # train prints its memory plan first
    assert last.startswith(f"vlbridge {command}: error: "), err
    for text in expected:
        assert text in last, err


def test_a_tokenize_returning_lists_is_named_by_caption(tmp_path, capsys):
    """It was "internal error: AttributeError: 'list' object has no attribute 'shape'" (exit 1)."""
    image = tmp_path / "red.png"
    Image.new("RGB", (16, 16), "red").save(image)
    assembly = tmp_path / "assembly.yaml"
    assembly.write_text(yaml.safe_dump(fake.assembly(connector="linear", llm="lists")), encoding="utf-8")
    with using_registry(fake.registry(lists=llm_plugin("build_list_tokenize_llm", "lists"))):
        code = main(["caption", "-a", str(assembly), "--max-new-tokens", "2", "--num-beams", "1", str(image)])
    one_paragraph_error(code, capsys.readouterr().err, "caption", f"{LISTS}, padding_side='left') returned a tuple of 2 (list, list)",
                        MUST_RETURN, "return_tensors='pt'")


def test_a_tokenize_returning_lists_is_named_by_train(tmp_path, capsys):
    """It was "internal error: AttributeError: 'list' object has no attribute 'masked_fill'" (exit 1)."""
    data = write_caption_data(tmp_path / "data", images=4)
    run = config(data, tmp_path / "run", assembly=fake.assembly(connector="linear", llm="lists"), stage=2, steps=3)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(run), encoding="utf-8")
    with using_registry(fake.registry(lists=llm_plugin("build_list_tokenize_llm", "lists"))):
        code = main(["train", str(path)])
    one_paragraph_error(code, capsys.readouterr().err, "train", f"{LISTS}, max_length=32, padding_side='right') returned", MUST_RETURN)


def test_a_tokenize_returning_lists_is_named_by_lmms_scoring():
    from vlbridge.lmms.likelihood import continuation_scores

    with using_registry(fake.registry(lists=llm_plugin("build_list_tokenize_llm", "lists"))):
        model = vlbridge.build(fake.assembly(connector="linear", llm="lists"))
        with pytest.raises(PluginError, match=r"tokenize\(texts, padding_side='right'\) returned a tuple of 2 \(list, list\)"):
            continuation_scores(model, [Image.new("RGB", (16, 16))], ["Question: what? Answer:"], [" red"])


@pytest.mark.parametrize("returned, shown", [
    (lambda ids, mask: {"input_ids": ids, "attention_mask": mask}, "returned a dict for 2 texts"),
    (lambda ids, mask: (ids.int(), mask.int()), "returned a tuple of 2 ((2, 4) torch.int32 tensor, (2, 4) torch.int32 tensor)"),
    (lambda ids, mask: (ids[:1], mask[:1]), "returned a tuple of 2 ((1, 4) torch.int64 tensor, (1, 4) torch.int64 tensor) for 2 texts"),
    (lambda ids, mask: ids, "returned a (2, 4) torch.int64 tensor"),
])
def test_a_tokenize_of_the_wrong_type_or_shape_is_named(monkeypatch, returned, shown):
    from vlbridge.plugin.contract import tokenized

    class Llm:
        def tokenize(self, texts, **kwargs):
            return returned(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))

    with pytest.raises(PluginError, match="two \\(2, length\\) int64 tensors") as err:
        tokenized("llm 'x'", Llm(), ["a", "b"], padding_side="right")
    assert f"llm 'x': tokenize(texts, padding_side='right') {shown}" in str(err.value)


def test_a_connector_that_answers_otherwise_while_training_is_named():
    """The build checks one eval-mode batch; a tuple while training failed in the LLM, naming nothing."""
    plugin = fake.connector_plugin("build_tuple_while_training", name="moody")
    with using_registry(fake.registry(moody=plugin)):
        model = vlbridge.build(fake.assembly("moody")).train()
        embeds = torch.zeros(2, model.plan.encoder_out.num_tokens, model.plan.encoder_out.width)
        with pytest.raises(PluginError, match=r"connector 'moody' \(plugin vlbridge-moody\): forward returned a tuple; it must "
                                              r"return one tensor of shape \(batch, tokens, width\) = \(2, 4, 64\)"):
            Stage2Objective()(model, {"text": ["a red square", "a blue one"], "image_embeds": embeds})


def test_an_encoder_that_loses_the_batch_is_named():
    """The build's check runs one image, so an encoder answering for the first image only passed it."""
    encoder = fake.plugin("patches", encoders=[fake.plain_encoder_spec("build_first_image_only_encoder")])
    with using_registry(fake.registry(patches=encoder, pool=fake.connector_plugin())):
        model = vlbridge.build(fake.assembly(encoder="patches"))
        with pytest.raises(PluginError, match=r"encoder 'patches' \(plugin vlbridge-patches\): forward returned shape \(1, 16, 8\) "
                                              r"for a batch of 2"):
            model.caption([Image.new("RGB", (28, 28))] * 2, num_beams=1, max_new_tokens=2)


def test_a_format_prompt_that_returns_chat_messages_is_named():
    """The list went on to tokenize, whose tokenizer failed on it with a message that named nothing."""
    with using_registry(fake.registry(chat=llm_plugin("build_chat_messages_llm", "chat"))):
        model = vlbridge.build(fake.assembly(connector="linear", llm="chat"))
        with pytest.raises(PluginError, match=r"llm 'chat' \(plugin vlbridge-chat\): format_prompt\(prompt\) returned a list "
                                              r"\(\[\{'role': 'user'.*it must return the prompt's text, a string"):
            model.answer(Image.new("RGB", (28, 28)), "what colour?", num_beams=1, max_new_tokens=2)


def test_a_caption_suffix_that_is_not_a_string_stops_the_build():
    """Training appends it to every caption: a TypeError there, after the model was built."""
    plugin = llm_plugin("build_suffixless_llm", "suffixless")
    expected = r"llm 'suffixless' \(plugin vlbridge-suffixless\): caption_suffix must be a string"
    with using_registry(fake.registry(suffixless=plugin)):
        with pytest.raises(PluginError, match=expected):
            vlbridge.build(fake.assembly(connector="linear", llm="suffixless"))
    with pytest.raises(PluginError, match="caption_suffix must be a string"):
        check_plugin(plugin)


STAGE1_FAULTS = {  # a Q-Former-like connector's stage-1 answer gone wrong, and what the objective says
    "text_features returns a pair": (
        "text_features", lambda real: lambda ids, mask: (real(ids, mask), None),
        "text_features(input_ids, attention_mask) returned a tuple of 2 ((4, 256) torch.float32 tensor, NoneType); "
        "it must return the ITC text features (B, E), a (4, ?) tensor"),
    "itm_logits keeps the queries": (
        "itm_logits", lambda real: lambda ids, mask, images: real(ids, mask, images)[:, None].expand(-1, 3, -1),
        "itm_logits(input_ids, attention_mask, images) returned a (12, 3, 2) torch.float32 tensor; it must return "
        "no-match / match logits (B, 2), a (12, 2) tensor"),
    "the tokenizer ignores return_tensors": (
        "tokenizer", lambda real: lambda texts, **kwargs: {k: v.tolist() for k, v in real(texts, **kwargs).items()},
        "tokenizer(texts, ..., max_length=33, return_tensors='pt')['input_ids'] returned a list of 4 (list, list, list, ...); "
        "it must return padded input_ids, a (4, 33) tensor"),  # 33: max_text_tokens + 1 tells the captions cut at 32
}


@pytest.mark.parametrize("fault", STAGE1_FAULTS)
def test_a_stage1_answer_of_the_wrong_type_or_shape_is_named(monkeypatch, fault):
    """These failed inside the losses (an AttributeError on a tuple or a list, or a shape error
    that named no plugin)."""
    from tests.test_objectives import make_batch
    from vlbridge.train.objectives import Stage1Objective

    model = vlbridge.build("tiny-qformer-opt", stage=1).train()
    name, broken, expected = STAGE1_FAULTS[fault]
    answer = broken(getattr(model.connector, name))
    if isinstance(getattr(type(model.connector), name, None), property):  # the tokenizer
        monkeypatch.setattr(type(model.connector), name, property(lambda self: answer))
    else:
        monkeypatch.setattr(model.connector, name, answer)
    with pytest.raises(PluginError) as err:
        Stage1Objective()(model, make_batch(model))
    assert str(err.value).startswith("connector 'qformer' (plugin vlbridge): ") and expected in str(err.value), err.value
