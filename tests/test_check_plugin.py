"""vlbridge.plugintest.check.check_plugin builds each component and calls what vlbridge will call, so a
plugin's author learns about a missing piece from their own test."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

from tests import fake_plugins as fake
from vlbridge import IncompatibleError, LLMDims, PluginError, TokenShape, VLBridgeError
from vlbridge.plugin.sources import WeightSource, local
from vlbridge.plugintest.check import check_plugin

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BUILTINS = {
    "vlbridge.plugins.encoders.eva_vit_g": {"eva-vit-g": {"variant": "tiny"}},
    "vlbridge.plugins.encoders.clip_vit_l": {"clip-vit-l": {"variant": "tiny"}},
    "vlbridge.plugins.encoders.open_clip_tower": {"open-clip": {"arch": "tiny"}},
    "vlbridge.plugins.encoders.hf_vision": {"hf-vision": {"variant": "tiny"}},
    "vlbridge.plugins.connectors.projectors": {},
    "vlbridge.plugins.connectors.qformer": {"qformer": {"variant": "tiny"}},  # stage 1 runs the real objective
    "vlbridge.plugins.llms.opt": {"opt": {"variant": "tiny"}},
    "vlbridge.plugins.llms.flan_t5": {"flan-t5": {"variant": "tiny"}},
}


@pytest.mark.parametrize("module", BUILTINS)
def test_builtins_pass_with_building(module):
    assert check_plugin(module, options=BUILTINS[module])


def test_a_plain_connector_passes():
    assert [s.name for s in check_plugin(fake.connector_plugin())] == ["pool"]


def test_a_forward_without_a_loss_is_named():
    """A None loss failed as "TypeError: unsupported operand type(s) for +: 'int' and 'NoneType'",
    in check_plugin and in training (an internal error there)."""
    with pytest.raises(VLBridgeError, match=r"llm 'lossless' \(plugin fake_lossless\): its forward was given labels but returned loss=None; it must return the mean LM loss"):
        check_plugin(fake.plugin("lossless", llms=[fake.tiny_opt_spec("build_lossless_llm", "lossless")]))


def test_an_instruction_aware_connector_gets_its_instructions():
    """vlbridge always calls such a forward with instructions=...; check_plugin called it without
    them, so a connector that follows the guide failed its own test."""
    assert [s.name for s in check_plugin(fake.connector_plugin("build_instructed"))] == ["pool"]
    assert check_plugin("vlbridge.plugins.connectors.qformer", options={"qformer": {"variant": "tiny", "instruction_aware": True}})


@pytest.mark.parametrize("plugin, expected", [
    (fake.connector_plugin(stages=(1, 2), num_params=None), "cannot train in stage 1: its module (MeanPool) lacks set_stage, tokenizer"),
    (fake.connector_plugin("build_with_set_stage", stages=(1, 2), num_params=None), "(WithSetStage) lacks tokenizer, image_context"),
    (fake.connector_plugin(num_params=lambda o, e, w: {2: 7}),
     "num_params() declares 7 trainable parameters in stage 2 but the module trains 2,112"),
    (fake.connector_plugin(output=lambda o, e, w: TokenShape(5, w)), "declared 5 tokens x 64 but produces 4 tokens x 64"),
    (fake.connector_plugin("build_loses_batch"), "forward returned shape (1, 4, 64) for a batch of 2"),
    (fake.connector_plugin("build_forward_raises"), "raised ValueError: pooling exploded"),
    (fake.connector_plugin("build_not_a_module"), "returned a dict; it must return a torch.nn.Module"),
    (fake.connector_plugin("build_unused_parameter", num_params=None),
     "2 trainable parameter(s) get no gradient through forward (spare.weight, spare.bias)"),
    (fake.plugin("patches", encoders=[fake.plain_encoder_spec(width=12)]), "declared 16 tokens x 12 but produces 16 tokens x 8"),
    (fake.plugin("bare", llms=[fake.bare_llm_spec()]), "its module (Linear) lacks embed_width, is_encoder_decoder, caption_suffix"),
    (fake.plugin("ends", llms=[fake.tiny_opt_spec("build_end_token_llm", "ends")]),
     "does not begin tokenize(prompt + caption)"),
    (fake.plugin("lists", llms=[fake.tiny_opt_spec("build_list_tokenize_llm", "lists")]),
     "tokenize(texts, padding_side='right') returned a tuple of 2 (list, list) for 1 texts; it must return (input_ids, "
     "attention_mask), two (1, length) int64 tensors"),  # was AttributeError
    (fake.plugin("patches", encoders=[replace(fake.plain_encoder_spec(), num_params=lambda o: 1000)]),
     "num_params() declares 1,000 frozen parameters but the built module has 1,184; validate and the memory plan report "
     "the declared count, so it must equal the module's (return vlbridge.SizeEstimate(count, note) where only a generic "
     "formula fits: validate prints it as ~, and check_plugin allows 10% off"),
    (fake.plugin("counted", llms=[replace(fake.tiny_opt_spec("build_greedy_only_llm", "counted"), num_params=lambda o: 5)]),
     "num_params() declares 5 frozen parameters but the built module has 142,336"),
    (fake.plugin("vocab", llms=[replace(fake.tiny_opt_spec("build_greedy_only_llm", "vocab"),
                                        dims=lambda o: LLMDims(64, 128, False, vocab_size=1024))]),
     "dims() declares vocab_size=1,024 but forward's logits are 530 wide"),
])
def test_missing_pieces_fail_the_plugins_own_test(plugin, expected):
    with pytest.raises(PluginError) as err:
        check_plugin(plugin)
    assert expected in str(err.value) and plugin.__name__ in str(err.value)  # names the plugin module


def test_build_false_checks_declarations_only():
    broken = fake.connector_plugin("no_such_factory")
    assert check_plugin(broken, build=False)
    with pytest.raises(PluginError, match="importing its factory 'tests.fake_plugins:no_such_factory' raised AttributeError"):
        check_plugin(broken)


def test_options_and_probe_arguments():
    with pytest.raises(VLBridgeError, match=r"names \['nope'\], which the plugin does not declare"):
        check_plugin(fake.connector_plugin(), options={"nope": {}})
    with pytest.raises(VLBridgeError, match="bad options for connector 'pool'"):
        check_plugin(fake.connector_plugin(), options={"pool": {"unknown": 1}})
    assert check_plugin(fake.connector_plugin(), probe=(TokenShape(3, 5), 7))


def test_a_connector_declining_every_probe_says_how_to_choose_one():
    def picky(opts, encoder_out, llm_width):
        if encoder_out.width != 99:
            raise IncompatibleError("needs 99-wide encoder tokens")
        return TokenShape(4, llm_width)

    with pytest.raises(PluginError, match="declined every probe input.*needs 99-wide.*probe=") as err:
        check_plugin(fake.connector_plugin(output=picky))
    assert check_plugin(fake.connector_plugin(output=picky), probe=(TokenShape(8, 99), 16))
    assert "probe=" in str(err.value)


def test_check_plugin_without_build_imports_no_torch():
    code = ("import sys; from vlbridge.plugintest.check import check_plugin; "
            "check_plugin('vlbridge.plugins.connectors.projectors', build=False); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_an_encoder_may_declare_an_unknown_size():
    """num_params() returning None means 'not known from the config' (validate prints '?'), not a fault."""
    specs = check_plugin("vlbridge.plugins.encoders.open_clip_tower", build=False, options={"open-clip": {"arch": "EVA02-B-16"}})
    assert [spec.name for spec in specs] == ["open-clip"]


@pytest.mark.parametrize("declared, expected", [
    (lambda opts, stage: None, "weight_sources() must return a list of vlbridge.plugin.sources.WeightSource, got NoneType"),
    (lambda opts, stage: ["/models/pool.safetensors"], "weight_sources() returned a str; expected WeightSource"),
    (lambda opts, stage: [local("checkpoint", "/models/pool.safetensors", "a .safetensors file")],
     "a WeightSource names option 'checkpoint', which its options do not have"),
    (lambda opts, stage: [WeightSource("hub", "", "a hub id", "org/pool", files=("model.safetensors",))],
     "a WeightSource names option ''"),
    (lambda opts, stage: 1 / 0, "weight_sources() raised ZeroDivisionError"),
])
def test_declared_weight_sources_are_checked_without_building(declared, expected):
    spec = fake.connector_plugin().vlbridge_register_connectors()[0]
    plugin = fake.plugin("pool", connectors=[replace(spec, weight_sources=declared)])
    with pytest.raises(PluginError) as err:
        check_plugin(plugin, build=False)
    assert expected in str(err.value) and "connector 'pool'" in str(err.value)


def test_the_builtins_declare_their_weight_sources():
    """Every built-in frozen part says what it loads; a checked declaration, not a table in vlbridge's core."""
    modules = {**BUILTINS, "vlbridge.plugins.llms.hf_causal_lm": {}, "vlbridge.plugins.llms.hf_seq2seq": {}}
    specs = [spec for module, options in modules.items() for spec in check_plugin(module, build=False, options=options)]
    assert {spec.name for spec in specs if spec.weight_sources is None} == {"linear", "mlp"}  # projectors load nothing


def test_weight_sources_must_be_a_function():
    spec = replace(fake.connector_plugin().vlbridge_register_connectors()[0], weight_sources="/models/pool.safetensors")
    with pytest.raises(PluginError, match=r"pool: weight_sources must be a function \(options, stage\) -> list\[WeightSource\] or None, got str"):
        check_plugin(fake.plugin("pool", connectors=[spec]), build=False)


def test_an_llm_without_beam_search_passes_when_it_says_so():
    """The guide's way to decline num_beams > 1 (a VLBridgeError naming it) passes; greedy must work."""
    assert [s.name for s in check_plugin(fake.plugin("greedy", llms=[fake.tiny_opt_spec("build_greedy_only_llm", "greedy")]))] == ["greedy"]


def test_an_encoder_decoder_tokenize_must_take_add_special_tokens():
    """lmms-eval scores an encoder-decoder's continuations tokenized with add_special_tokens=False (the
    guide's table says so); a tokenize without it passed the check and failed in the first lmms task."""
    plugin = fake.plugin("t5ish", llms=[fake.tiny_t5_spec("build_t5_without_special_token_choice", "t5ish")])
    with pytest.raises(PluginError, match=r"t5ish.*tokenize\(texts, padding_side='right', add_special_tokens=False\)"):
        check_plugin(plugin)


def test_a_hook_that_raises_is_named():
    def vlbridge_register_connectors():
        raise ValueError("no such config")

    import vlbridge

    plugin = fake.plugin("raising")
    plugin.vlbridge_register_connectors = vlbridge.hookimpl(vlbridge_register_connectors)
    with pytest.raises(PluginError, match=r"fake_raising.vlbridge_register_connectors: the hook raised ValueError: no such config"):
        check_plugin(plugin)


REGISTRATION = """
{heavy}
import vlbridge


@vlbridge.hookimpl
def vlbridge_register_connectors():
    return [vlbridge.ConnectorSpec(name="pool", factory="tests.fake_plugins:build_pool",
                                   output=lambda opts, encoder_out, llm_width: vlbridge.TokenShape(4, llm_width))]
"""


@pytest.mark.parametrize("heavy, expected", [("import torch", "importing it imports torch"), ("", None)])
def test_a_registration_module_that_imports_torch_fails(tmp_path, monkeypatch, heavy, expected):
    """The guide's rule (section 3) for the module vlbridge imports to list and validate; check_plugin
    passed such a module, even with build=False, whatever the test suite had imported before."""
    name = f"registration_{'heavy' if heavy else 'light'}"
    (tmp_path / f"{name}.py").write_text(REGISTRATION.format(heavy=heavy), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    if expected is None:
        assert [s.name for s in check_plugin(name, build=False)] == ["pool"]
        return
    with pytest.raises(PluginError, match=expected) as err:
        check_plugin(name, build=False)
    assert "docs/writing-plugins.md, section 3" in str(err.value)


def test_a_registration_module_that_prints_is_not_taken_for_heavy_imports(tmp_path, monkeypatch):
    """The probe read the fresh interpreter's whole stdout as module names: a module printing a banner
    at import failed as 'importing it imports hello,'."""
    (tmp_path / "registration_chatty.py").write_text('print("hello, plugin loaded")\n' + REGISTRATION.format(heavy=""),
                                                    encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert [s.name for s in check_plugin("registration_chatty", build=False)] == ["pool"]


def test_a_bare_transformers_llm_is_pointed_to_the_wrapper():
    """A factory returning the transformers model itself was told only which members it lacks, not that
    vlbridge's CausalLM wrapper provides them all (docs/writing-plugins.md, 5.4)."""
    unwrapped = replace(fake.bare_llm_spec(), name="unwrapped", factory="tests.fake_plugins:build_unwrapped_llm")
    with pytest.raises(PluginError) as err:
        check_plugin(fake.plugin("unwrapped", llms=[unwrapped]))
    assert "its module (OPTForCausalLM) lacks embed_width" in str(err.value)
    assert ("a transformers model gets them all by returning vlbridge.plugins.llms.hf_causal_lm_model.CausalLM(model, "
            "tokenizer, end_token_id=..., caption_suffix=...)") in str(err.value)
    with pytest.raises(PluginError) as err:
        check_plugin(fake.plugin("bare", llms=[fake.bare_llm_spec()]))
    assert "CausalLM" not in str(err.value)  # a module that is no transformers model is not sent there
