"""A plugin's shortcoming never reaches the user as vlbridge's "internal error": the CLI exits 2
with one message naming the component, the plugin's distribution and what is wrong."""

from __future__ import annotations

import pytest
import yaml
from PIL import Image

from tests import fake_plugins as fake
from vlbridge.cli.main import main
from vlbridge.plugintest.check import using_registry

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
