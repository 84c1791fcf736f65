"""A plugin's shortcoming never reaches the user as vlbridge's "internal error": the CLI exits 2
with one message naming the component, the plugin's distribution and what is wrong."""

from __future__ import annotations

from dataclasses import replace

import pytest
import yaml
from PIL import Image

from tests import fake_plugins as fake
from vlbridge.cli.main import main
from vlbridge.plugintest.check import using_registry
from vlbridge.plugin.specs import LLMDims, Preprocess, SizeEstimate

CONNECTOR_FAULTS = {
    "factory raises": ("build_raises", "its factory 'tests.fake_plugins:build_raises' raised RuntimeError: cannot find my weights"),
    "factory returns a dict": ("build_not_a_module", "returned a dict; it must return a torch.nn.Module"),
    "factory not importable": ("no_such_factory", "importing its factory 'tests.fake_plugins:no_such_factory' raised AttributeError"),
    "forward raises": ("build_forward_raises", "forward on image tokens of shape (2, 17, 64) raised ValueError: pooling exploded"),
    "forward loses the batch": ("build_loses_batch", "forward returned shape (1, 4, 64) for a batch of 2"),
}


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (16, 16), "red").save(path)
    return str(path)


def caption(tmp_path, image: str, capsys, assembly: dict) -> tuple[int, str]:
    path = tmp_path / "assembly.yaml"
    path.write_text(yaml.safe_dump(assembly), encoding="utf-8")
    code = main(["caption", "-a", str(path), "--max-new-tokens", "2", "--num-beams", "1", image])
    return code, capsys.readouterr().err


def assert_user_error(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    assert "internal error" not in err and "Traceback" not in err
    assert err.startswith("vlbridge caption: error: ") and err.count("\n") == 1  # one paragraph
    for text in expected:
        assert text in err


@pytest.mark.parametrize("fault", CONNECTOR_FAULTS)
def test_a_broken_connector_is_named_with_what_is_wrong(tmp_path, image, capsys, fault):
    factory, expected = CONNECTOR_FAULTS[fault]
    with using_registry(fake.registry(bad=fake.connector_plugin(factory, name="bad"))):
        code, err = caption(tmp_path, image, capsys, fake.assembly("bad"))
    assert_user_error(code, err, "connector 'bad' (plugin vlbridge-bad)", expected)


def test_a_lying_connector_spec_is_named(tmp_path, image, capsys):
    lying = fake.connector_plugin(name="liar", output=lambda o, e, w: fake.TokenShape(9, w))
    with using_registry(fake.registry(liar=lying)):
        code, err = caption(tmp_path, image, capsys, fake.assembly("liar"))
    assert_user_error(code, err, "connector 'liar' (plugin vlbridge-liar) declared 9 tokens x 64 but produces 4 tokens x 64")


def test_an_encoder_of_the_wrong_shape_is_named(tmp_path, image, capsys):
    encoder = fake.plugin("patches", encoders=[fake.plain_encoder_spec(width=12)])
    with using_registry(fake.registry(patches=encoder, pool=fake.connector_plugin())):
        code, err = caption(tmp_path, image, capsys, fake.assembly(encoder="patches"))
    assert_user_error(code, err, "encoder 'patches' (plugin vlbridge-patches) declared 16 tokens x 12 but produces 16 tokens x 8")


def test_an_llm_without_the_llm_interface_is_named(tmp_path, image, capsys):
    with using_registry(fake.registry(bare=fake.plugin("bare", llms=[fake.bare_llm_spec()]), pool=fake.connector_plugin())):
        code, err = caption(tmp_path, image, capsys, fake.assembly(llm="bare"))
    assert_user_error(code, err, "llm 'bare' (plugin vlbridge-bare): its module (Linear) lacks embed_width, is_encoder_decoder, "
                                 "caption_suffix, tokenize, decode, generate")


def test_an_llm_whose_decode_returns_one_string_is_named(tmp_path, image, capsys):
    """Its one string was read as one caption per character: `caption` printed its first letter."""
    llm = fake.plugin("joined", llms=[fake.tiny_opt_spec("build_joined_decode_llm", "joined")])
    with using_registry(fake.registry(joined=llm, pool=fake.connector_plugin())):
        code, err = caption(tmp_path, image, capsys, fake.assembly(llm="joined"))
    assert_user_error(code, err, "llm 'joined' (plugin vlbridge-joined): decode(token_ids) returned a str; "
                                 "it must return a list of 1 strings, one per row")


DECLARATION_FAULTS = {  # what a spec's pure functions may get wrong, and what validate then says
    "output raises": (dict(output=lambda o, e, w: 1 / 0), "output() raised ZeroDivisionError: division by zero"),
    "output returns a tuple": (dict(output=lambda o, e, w: (4, w)), "output() returned (4, 64); it must return a TokenShape"),
    "num_params raises": (dict(num_params=lambda o, e, w: {}[2]), "num_params() raised KeyError: 2"),
    "num_params returns an int": (dict(num_params=lambda o, e, w: 7), "num_params() returned 7; it must return a dict {stage: count}"),
    "activations raise": (dict(activations=lambda o, e, w, t: 1 / 0), "activations() raised ZeroDivisionError"),
}


@pytest.mark.parametrize("fault", DECLARATION_FAULTS)
def test_a_faulty_declaration_is_named_by_validate(tmp_path, capsys, fault):
    """These were "internal error: AttributeError: 'tuple' object has no attribute 'width'" (exit 1),
    or "a shape function raised ..." without saying whose."""
    changes, expected = DECLARATION_FAULTS[fault]
    plugin = fake.plugin("bad", connectors=[replace(fake.connector_plugin().vlbridge_register_connectors()[0], name="bad", **changes)])
    path = tmp_path / "assembly.yaml"
    path.write_text(yaml.safe_dump(fake.assembly("bad")), encoding="utf-8")
    with using_registry(fake.registry(bad=plugin)):
        code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "internal error" not in err, err
    assert f"connector 'bad' (plugin vlbridge-bad): {expected}" in err, err


@pytest.mark.parametrize("preprocess, expected", [
    (lambda o: 28, "preprocess() returned 28; it must return a vlbridge.Preprocess"),
    # passed validate, then failed the build as "internal error: TypeError: zeros(): argument 'size' ..."
    (lambda o: Preprocess(224 / 8, (0.5,) * 3, (0.5,) * 3),
     "preprocess() raised ValueError: image_size must be a positive whole number of pixels (an int); got 28.0"),
    (lambda o: Preprocess(28, (0.5,) * 3, (0.5,) * 3, resize_size=32.0),
     "preprocess() raised ValueError: resize_size must be a positive whole number of pixels (an int); got 32.0"),
])
def test_an_encoders_faulty_declaration_is_named_by_validate(tmp_path, capsys, preprocess, expected):
    encoder = fake.plugin("patches", encoders=[replace(fake.plain_encoder_spec(), preprocess=preprocess)])
    path = tmp_path / "assembly.yaml"
    path.write_text(yaml.safe_dump(fake.assembly(encoder="patches")), encoding="utf-8")
    with using_registry(fake.registry(patches=encoder, pool=fake.connector_plugin())):
        code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and f"encoder 'patches' (plugin vlbridge-patches): {expected}" in err, err


def test_an_estimate_with_a_negative_count_says_what_a_size_must_be(tmp_path, capsys):
    """This said "returned SizeEstimate(count=-3, ...); it must return an int, a vlbridge.SizeEstimate or None",
    refusing a SizeEstimate for not being one."""
    encoder = fake.plugin("patches", encoders=[replace(fake.plain_encoder_spec(), num_params=lambda o: SizeEstimate(-3, "12 W^2"))])
    path = tmp_path / "assembly.yaml"
    path.write_text(yaml.safe_dump(fake.assembly(encoder="patches")), encoding="utf-8")
    with using_registry(fake.registry(patches=encoder, pool=fake.connector_plugin())):
        code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and ("num_params() returned SizeEstimate(count=-3, note='12 W^2'); it must return an exact count (an int, "
                          "0 or more), a vlbridge.SizeEstimate(count, note) (count such an int, or None where unknown") in err, err


@pytest.mark.parametrize("dims", [LLMDims(64, None, False), LLMDims("64", 128, False), LLMDims(64, 128, False, vocab_size="530")])
def test_an_llms_dims_with_fields_of_the_wrong_type_are_named_by_validate(tmp_path, capsys, dims):
    """dims() returning an LLMDims passed whatever its fields held: a context of None was an internal
    TypeError, a width of '64' was blamed on the connector, and a vocabulary of '530' passed validate
    (the memory plan would multiply by a string)."""
    opt = fake.registry().components["llm"]["opt"][0]
    plugin = fake.plugin("badllm", llms=[replace(opt, name="badllm", dims=lambda o: dims)])
    path = tmp_path / "assembly.yaml"
    path.write_text(yaml.safe_dump({**fake.assembly("qformer"), "llm": {"use": "badllm", "options": {"variant": "tiny"}}}), encoding="utf-8")
    with using_registry(fake.registry(badllm=plugin)):
        code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "internal error" not in err, err
    assert "llm 'badllm' (plugin vlbridge-badllm): dims() returned LLMDims(" in err and "it must return a vlbridge.LLMDims of positive ints" in err, err
