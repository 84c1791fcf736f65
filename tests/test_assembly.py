"""Assembly validation: presets, plans, and every kind of problem, reported together."""

from __future__ import annotations

import pickle

import pytest

from vlbridge import AssemblyError, load_assembly
from vlbridge.plugin.resources import presets


def assembly(**overrides):
    base = {
        "name": "test",
        "encoder": {"use": "eva-vit-g"},
        "connector": {"use": "qformer"},
        "llm": {"use": "opt", "options": {"variant": "2.7b"}},
    }
    base.update(overrides)
    return base


def problems_of(source) -> list[str]:
    with pytest.raises(AssemblyError) as err:
        load_assembly(source)
    return err.value.problems


@pytest.mark.parametrize("name", sorted(presets()))
def test_every_preset_validates(name):
    plan = load_assembly(name).plan
    assert plan.name == name
    assert plan.connector_out.width == plan.llm_dims.embed_width
    assert plan.total_tokens <= plan.llm_dims.context_length


def test_blip2_opt_plan_joints_and_counts():
    plan = load_assembly("blip2-opt-2.7b").plan
    assert (plan.encoder_out.num_tokens, plan.encoder_out.width) == (257, 1408)
    assert (plan.connector_out.num_tokens, plan.connector_out.width) == (32, 2560)
    assert plan.trainable_params == {1: 186_705_470, 2: 107_133_696}
    assert plan.frozen_params == plan.encoder.params + plan.llm.params
    assert plan.llm.params == pytest.approx(2.65e9, rel=0.01)
    assert plan.preprocess.image_size == 224


def test_llava_preset_feeds_all_patch_tokens():
    plan = load_assembly("llava-mlp-opt-2.7b").plan
    assert (plan.encoder_out.num_tokens, plan.connector_out.num_tokens, plan.connector_out.width) == (576, 576, 2560)


def test_opt_350m_uses_its_512_wide_input_embeddings():
    plan = load_assembly(assembly(llm={"use": "opt", "options": {"variant": "350m"}})).plan
    assert plan.connector_out.width == 512


def test_plan_is_picklable_and_json_ready():
    plan = load_assembly("tiny-qformer-opt").plan
    assert pickle.loads(pickle.dumps(plan)) == plan
    assert plan.to_dict()["trainable_params"]["2"] == plan.trainable_params[2]


def test_yaml_file_round_trip(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("name: mine\nencoder: {use: clip-vit-l, options: {image_size: 336}}\nconnector: {use: linear}\nllm: {use: flan-t5, options: {variant: base}}\n")
    plan = load_assembly(path).plan
    assert (plan.connector_out.num_tokens, plan.connector_out.width) == (577, 768)


def test_unknown_part_suggests():
    (problem,) = problems_of(assembly(connector={"use": "qfromer"}))
    assert problem.startswith("connector.use: unknown connector 'qfromer'. Did you mean 'qformer'?")
    assert "Installed connectors: linear, mlp, qformer" in problem


@pytest.mark.parametrize("llm", [{"use": "opt-typo"}, {"use": "opt", "options": {"variant": "huge"}}])
def test_an_llm_that_does_not_resolve_is_one_problem(llm):
    """It was taken for an LLM-free assembly, adding "connector 'linear' trains only with an LLM ...;
    add an llm: slot" under an assembly that has one (e.g. a checkpoint whose LLM plugin is missing)."""
    (problem,) = problems_of(assembly(connector={"use": "linear"}, llm=llm))
    assert problem.startswith("llm."), problem


def test_option_errors_carry_their_yaml_path():
    problems = problems_of(assembly(encoder={"use": "eva-vit-g", "options": {"image_size": "big", "colour": 1}}))
    assert any(p.startswith("encoder.options.image_size: Input should be a valid integer") for p in problems)
    assert any(p.startswith("encoder.options.colour: unknown option; valid options are: variant, image_size") for p in problems)


def test_bad_literal_names_the_choices():
    (problem,) = problems_of(assembly(llm={"use": "opt", "options": {"variant": "13b"}}))
    assert problem.startswith("llm.options.variant: Input should be '125m', '350m', '1.3b', '2.7b', '6.7b' or 'tiny'")


def test_width_mismatch_names_both_parts_and_numbers():
    (problem,) = problems_of(assembly(
        encoder={"use": "clip-vit-l"}, connector={"use": "linear", "options": {"encoder_width": 1408}}))
    assert "connector 'linear' cannot join encoder 'clip-vit-l' (257 tokens x 1024)" in problem
    assert "1408" in problem and "1024" in problem


def test_third_party_connector_width_mismatch_with_llm(monkeypatch):
    import types

    import vlbridge
    from vlbridge import ConnectorSpec, TokenShape
    from vlbridge.plugintest.check import registry_with

    @vlbridge.hookimpl
    def vlbridge_register_connectors():
        return [ConnectorSpec(name="fixed", factory="m:f", output=lambda o, e, w: TokenShape(8, 4096))]

    plugin = types.ModuleType("fixed")
    plugin.vlbridge_register_connectors = vlbridge_register_connectors
    with pytest.raises(AssemblyError) as err:
        load_assembly(assembly(connector={"use": "fixed"}), registry=registry_with({"vlbridge-fixed": plugin}))
    assert err.value.problems == ["width mismatch: connector 'fixed' outputs 4096-wide tokens but llm 'opt' embeds tokens at 2560"]


def test_too_many_tokens_is_an_error_for_decoder_only():
    (problem,) = problems_of(assembly(
        encoder={"use": "clip-vit-l", "options": {"variant": "tiny", "image_size": 168}},
        connector={"use": "linear"}, llm={"use": "opt", "options": {"variant": "tiny"}}))
    assert problem.startswith("too many tokens: connector 'linear' feeds 145 visual tokens + max_text_tokens 32 = 177")
    assert "llm 'opt''s context of 128" in problem


def test_too_many_tokens_is_a_warning_for_encoder_decoder():
    result = load_assembly(assembly(
        encoder={"use": "eva-vit-g", "options": {"image_size": 364}}, connector={"use": "linear"},
        llm={"use": "flan-t5"}))
    (warning,) = result.plan.warnings
    assert "677 visual tokens" in warning and "512" in warning and "relative" in warning


def test_all_problems_in_one_pass():
    problems = problems_of({
        "name": "many", "colour": "red",
        "encoder": {"use": "eva-vit-gg"},
        "connector": {"use": "qformer", "options": {"num_query_tokens": 0}},
        "llm": {"use": "opt", "options": {"variant": "13b"}},
        "requires": ["vlbridge-not-installed>=1"],
    })
    joined = "\n".join(problems)
    for expected in ["colour: unknown key", "encoder.use: unknown encoder 'eva-vit-gg'",
                     "connector.options.num_query_tokens", "llm.options.variant",
                     "pip install 'vlbridge-not-installed>=1'"]:
        assert expected in joined, joined
    assert len(problems) == 5


def test_requires_checks_versions():
    problems = problems_of(assembly(requires=["pydantic<1", "not a requirement!!"]))
    assert any("pydantic" in p and "is installed but 'pydantic<1' is required; run: pip install 'pydantic<1'" in p for p in problems)
    assert any("is not a valid pip requirement" in p for p in problems)
    assert load_assembly(assembly(requires=["pydantic>=2"])).plan


def test_missing_slot_and_missing_name():
    problems = problems_of({"connector": {"use": "qformer"}, "llm": {"use": "opt"}})
    assert "name: Field required: a non-empty name for the model: it names its runs and saved checkpoints" in problems
    assert any(p.startswith("encoder: missing; give {use: NAME") and "eva-vit-g" in p for p in problems)


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nencoder: {use: eva-vit-g\n")
    (problem,) = problems_of(bad)
    assert problem.startswith("malformed YAML:") and "line" in problem
    assert problems_of(tmp_path / "nope.yaml") == [f"file not found: {tmp_path / 'nope.yaml'}"]
    (problem,) = problems_of("blip2-opt-2.7")
    assert "Did you mean 'blip2-opt-2.7b'" in problem and "Presets:" in problem


def test_non_mapping_yaml(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert "must be a YAML mapping" in problems_of(path)[0]


def test_llm_free_assembly_is_stage_1_only():
    plan = load_assembly(assembly(llm=None)).plan
    assert plan.llm is None and plan.connector_out is None and plan.stages == (1,)
    assert plan.trainable_params == {1: 186_705_470}
    assert "no LLM" in plan.describe()
    (problem,) = problems_of(assembly(llm=None, connector={"use": "linear"}))
    assert "trains only with an LLM" in problem
