"""`vlbridge train --check` builds the model on the meta device and catches what only built modules
show, each as a named problem with exit code 2, before any weight is read or allocated."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

import vlbridge
from tests import fake_plugins as fake
from tests.test_trainer_config import assert_user_error, train_cli
from tests.test_trainer_samples import config, write_caption_data
from vlbridge import LLMDims, LLMSpec
from vlbridge.plugintest.check import using_registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY_QFORMER = {"use": "qformer", "options": {"variant": "tiny", "num_query_tokens": 8, "ln_vision_eps": 1.0e-6}}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_caption_data(tmp_path_factory.mktemp("data"), images=4)


def inline(connector: dict | None = None, llm: dict | None = None) -> dict:
    """tiny-qformer-opt written out, with the connector or LLM replaced."""
    return {"name": "check", "encoder": {"use": "eva-vit-g", "options": {"variant": "tiny"}},
            "connector": connector or TINY_QFORMER, "llm": llm or {"use": "opt", "options": {"variant": "tiny"}}}


def test_a_sound_config_is_built_on_meta_and_valid(capsys, tmp_path, data):
    code, out, err = train_cli(capsys, tmp_path, config(data, tmp_path / "out", stage=2), "--check")
    assert code == 0, err
    assert "built on the meta device (no weights read or allocated): encoder, connector, llm" in out
    assert out.strip().endswith("valid") and not (tmp_path / "out").exists()


def test_lora_targets_the_llm_lacks(capsys, tmp_path, data):
    values = config(data, tmp_path / "out", stage=2, finetune={"lora": {"target_modules": ["nope_proj"]}})
    assert_user_error(*train_cli(capsys, tmp_path, values, "--check")[::2],
                      "finetune.lora.target_modules: ['nope_proj'] matches no layer", "'q_proj', 'v_proj'")


def test_unfreezing_more_blocks_than_the_encoder_runs(capsys, tmp_path, data):
    values = config(data, tmp_path / "out", finetune={"encoder": {"unfreeze": 99}})
    assert_user_error(*train_cli(capsys, tmp_path, values, "--check")[::2],
                      "finetune.encoder.unfreeze: 99 blocks asked for, but encoder 'eva-vit-g'", "runs 2")


def test_lr_scales_prefix_matching_no_trainable_parameter(capsys, tmp_path, data):
    values = config(data, tmp_path / "out", optimizer={"lr": 1e-3, "lr_scales": {"connector.nope": 0.1}})
    assert_user_error(*train_cli(capsys, tmp_path, values, "--check")[::2],
                      "optimizer.lr_scales: 'connector.nope' names no trainable parameter", "connector.query_tokens")
    values["optimizer"]["lr_scales"] = {"connector.layers": 0.1}
    assert train_cli(capsys, tmp_path, values, "--check")[0] == 0


def test_init_from_tensors_of_other_shapes(capsys, tmp_path, data):
    saved = vlbridge.build("tiny-qformer-opt", stage=1).save(tmp_path / "stage1")  # 8 query tokens
    values = config(data, tmp_path / "out", init_from=str(saved))
    assert train_cli(capsys, tmp_path, values, "--check")[0] == 0
    values["assembly"] = inline(connector={**TINY_QFORMER, "options": {**TINY_QFORMER["options"], "num_query_tokens": 4}})
    assert_user_error(*train_cli(capsys, tmp_path, values, "--check")[::2],
                      "init_from:", "tensor 'query_tokens' has shape (1, 8, ", "(1, 4, ")


def test_shapes_only_reads_the_header(tmp_path):
    from vlbridge.files.weights import read_tensors

    saved = vlbridge.build("tiny-qformer-opt", stage=1).save(tmp_path / "stage1")
    full = read_tensors(saved / "connector.safetensors")
    shapes = read_tensors(saved / "connector.safetensors", shapes_only=True)
    assert {k: (t.shape, t.dtype) for k, t in shapes.items()} == {k: (t.shape, t.dtype) for k, t in full.items()}
    assert all(t.is_meta for t in shapes.values())


def test_a_connector_factory_that_raises(capsys, tmp_path, data):
    with using_registry(fake.registry(pool=fake.connector_plugin("build_raises"))):
        values = config(data, tmp_path / "out", stage=2, assembly=fake.assembly())
        assert_user_error(*train_cli(capsys, tmp_path, values, "--check")[::2],
                          "assembly: building the model failed: connector 'pool' (plugin vlbridge-pool)",
                          "raised RuntimeError: cannot find my weights")


def test_a_factory_that_needs_real_tensors_is_left_to_the_run_not_refused(capsys, tmp_path, data):
    """A plugin factory that reads a tensor's value while building cannot build on the meta device,
    yet builds and trains for real: --check says it left it unbuilt, rather than refuse a sound config."""
    with using_registry(fake.registry(pool=fake.connector_plugin("build_reads_a_value"))):
        values = config(data, tmp_path / "out", stage=2, assembly=fake.assembly())
        code, out, err = train_cli(capsys, tmp_path, values, "--check")
        assert code == 0, err
        assert "not built: connector 'pool' (plugin vlbridge-pool)" in out and "needs real tensors to build" in out


def test_a_connector_whose_tokens_miss_the_llm_width(capsys, tmp_path, data):
    with using_registry(fake.registry(pool=fake.connector_plugin("build_wrong_width"))):
        values = config(data, tmp_path / "out", stage=2, assembly=fake.assembly())
        assert_user_error(*train_cli(capsys, tmp_path, values, "--check")[::2], "assembly: connector 'pool'", "65")


def test_an_llm_narrower_than_it_declares(capsys, tmp_path, data):
    from vlbridge.plugins.llms.opt import OPTOptions

    narrow = LLMSpec(name="narrow", factory="vlbridge.plugins.llms.opt_model:build", options=OPTOptions,
                     dims=lambda o: LLMDims(32, 128, False), weight_sources=lambda o, stage: [])
    with using_registry(fake.registry(narrow=fake.plugin("narrow", llms=[narrow]))):
        values = config(data, tmp_path / "out", stage=2, assembly=inline(llm={"use": "narrow", "options": {"variant": "tiny"}}))
        assert_user_error(*train_cli(capsys, tmp_path, values, "--check")[::2],
                          "llm 'narrow' (plugin vlbridge-narrow) declared embedding width 32 but the built model embeds at 64")


def test_fsdp_shard_of_a_part_that_trains_whole(capsys, tmp_path, data):
    values = config(data, tmp_path / "out", finetune={"encoder": {"unfreeze": "all"}},
                    parallel={"strategy": "fsdp", "shard": ["encoder"]})
    assert_user_error(*train_cli(capsys, tmp_path, values, "--check")[::2],
                      "parallel.shard: every parameter of the encoder trains", "nothing of the encoder to shard")
    # training itself refuses it too (it sharded nothing of the encoder, without a word)
    assert_user_error(*train_cli(capsys, tmp_path, values)[::2],
                      "parallel.shard: every parameter of the encoder trains", "nothing of the encoder to shard")
    values["finetune"]["encoder"]["unfreeze"] = 1
    assert train_cli(capsys, tmp_path, values, "--check")[0] == 0


def test_a_part_that_reads_weights_is_not_built(capsys, tmp_path, data, monkeypatch):
    """A real-size LLM from a local directory: --check names it unbuilt and never calls its factory."""
    from vlbridge.plugins.llms import opt_model

    llm_dir = tmp_path / "opt-2.7b"
    llm_dir.mkdir()
    (llm_dir / "config.json").write_text(json.dumps({
        "model_type": "opt", "hidden_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 32, "ffn_dim": 10240,
        "word_embed_proj_dim": 2560, "vocab_size": 50272, "max_position_embeddings": 2048, "do_layer_norm_before": True}))

    def refuse(opts):
        raise AssertionError("--check built an LLM that reads weights")

    monkeypatch.setattr(opt_model, "build", refuse)
    values = config(data, tmp_path / "out", stage=2, assembly=inline(llm={"use": "opt", "options": {"model": str(llm_dir)}}))
    code, out, err = train_cli(capsys, tmp_path, values, "--check")
    assert code == 0, err
    assert "built on the meta device (no weights read or allocated): encoder, connector" in out
    assert f"not built: llm 'opt' reads its weights from {llm_dir}" in out


def test_a_connector_that_reads_weights_leaves_nothing_built(capsys, tmp_path, data, monkeypatch):
    """A Q-Former started from a BERT directory: its factory would read that BERT, so nothing is built."""
    from vlbridge.modeling import factory

    bert = tmp_path / "bert"
    bert.mkdir()

    def refuse(*args):
        raise AssertionError("--check built a part that reads weights")

    monkeypatch.setattr(factory, "_build_frozen", refuse)
    monkeypatch.setattr(factory, "seeded", refuse)
    assembly = inline(connector={**TINY_QFORMER, "options": {**TINY_QFORMER["options"], "bert": str(bert)}})
    code, out, err = train_cli(capsys, tmp_path, config(data, tmp_path / "out", assembly=assembly), "--check")
    assert code == 0, err
    assert f"not built: connector 'qformer' reads its weights from {bert}, so --check builds no part" in out


def test_activation_checkpointing_of_an_llm_without_blocks(capsys, tmp_path, data):
    blockless = fake.tiny_opt_spec("build_blockless_llm", "blockless")
    blockless = dataclasses.replace(blockless, weight_sources=lambda o, stage: [])  # it reads no weights: built
    with using_registry(fake.registry(blockless=fake.plugin("blockless", llms=[blockless]))):
        values = config(data, tmp_path / "out", stage=2, parallel={"activation_checkpointing": True},
                        assembly=inline(llm={"use": "blockless", "options": {"variant": "tiny"}}))
        assert_user_error(*train_cli(capsys, tmp_path, values, "--check")[::2],
                          "parallel.activation_checkpointing: llm 'blockless' (plugin vlbridge-blockless) lists no blocks")
        # training itself refuses it too (it recomputed nothing and held every activation, without a word)
        assert_user_error(*train_cli(capsys, tmp_path, values)[::2],
                          "parallel.activation_checkpointing: llm 'blockless' (plugin vlbridge-blockless) lists no blocks")


def validate_cli(capsys, tmp_path: Path, values: dict, *flags: str) -> tuple[int, str, str]:
    from tests.test_trainer_samples import write_config
    from vlbridge.cli.main import main

    code = main(["validate", "--train", str(write_config(tmp_path / "train.yaml", values)), *flags])
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_train_runs_the_recipe_checks_on_its_real_build(capsys, tmp_path, data):
    """validate --train built the real model and counted what trains, but an lr_scales prefix naming
    nothing or an FSDP shard of a part that trains whole passed it as 'valid'; train --check refused both."""
    values = config(data, tmp_path / "out", optimizer={"lr": 1e-3, "lr_scales": {"connector.nope": 0.1}},
                    finetune={"encoder": {"unfreeze": "all"}}, parallel={"strategy": "fsdp", "shard": ["encoder"]})
    expected = ("optimizer.lr_scales: 'connector.nope' names no trainable parameter",
                "parallel.shard: every parameter of the encoder trains")
    assert_user_error(*validate_cli(capsys, tmp_path, values)[::2], "2 problems", *expected)
    code, out, _ = validate_cli(capsys, tmp_path, values, "--json")
    report = json.loads(out)
    assert code == 2 and not report["valid"] and [p.split(":")[0] for p in report["problems"]] == ["optimizer.lr_scales", "parallel.shard"]
    values["optimizer"]["lr_scales"], values["finetune"]["encoder"]["unfreeze"] = {"connector.layers": 0.1}, 1
    code, out, err = validate_cli(capsys, tmp_path, values)
    assert code == 0 and out.strip().endswith("valid"), err


def test_validate_train_refuses_activation_checkpointing_of_an_llm_without_blocks(capsys, tmp_path, data):
    blockless = dataclasses.replace(fake.tiny_opt_spec("build_blockless_llm", "blockless"), weight_sources=lambda o, stage: [])
    with using_registry(fake.registry(blockless=fake.plugin("blockless", llms=[blockless]))):
        values = config(data, tmp_path / "out", stage=2, parallel={"activation_checkpointing": True},
                        assembly=inline(llm={"use": "blockless", "options": {"variant": "tiny"}}))
        assert_user_error(*validate_cli(capsys, tmp_path, values)[::2],
                          "parallel.activation_checkpointing: llm 'blockless' (plugin vlbridge-blockless) lists no blocks")


def test_both_help_texts_say_what_each_checks_and_how_they_differ(capsys):
    from vlbridge.cli.main import main

    texts = {}
    for command in ("train", "validate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        texts[command] = " ".join(capsys.readouterr().out.split())
    assert "lr_scales and parallel settings" in texts["train"] and "validate --train CONFIG.yaml` runs the same model checks" in texts["train"]
    assert "optimizer.lr_scales and parallel settings checked on that model" in texts["validate"]
    assert "--train reads no data file" in texts["validate"] and "loading no weights" in texts["validate"]


def test_image_files_the_annotations_name_are_looked_for(capsys, tmp_path, data):
    """--check said 'valid' for annotations whose images were nowhere (a wrong image_root): the run then
    loaded the model and stopped at step 1 with every sample skipped."""
    values = config(data, tmp_path / "out")
    values["data"]["train"]["image_root"] = str(tmp_path)  # holds no images/ folder
    assert_user_error(*train_cli(capsys, tmp_path, values, "--check")[::2],
                      "data.train: none of the 4 image files its annotations name is there, e.g.",
                      f"{tmp_path / 'images' / '0.png'} (does not exist)", "set data.train.image_root to the folder")
    some = tmp_path / "some"
    shutil.copytree(data, some)
    (some / "images" / "3.png").unlink()
    code, out, err = train_cli(capsys, tmp_path, config(some, tmp_path / "out"), "--check")
    assert code == 0, err
    assert "data.train: 1 of 4 image files are missing (training skips and counts their samples)" in out
    assert out.strip().endswith("valid")


def test_validate_train_says_the_plan_warnings_once(capsys, tmp_path, data):
    """Its plan lists the assembly's warnings, and the build it runs to count what trains said each
    again (a `vlbridge validate: warning:` line, since builds say them): twice on the terminal."""
    assembly = {"name": "long-t5", "encoder": {"use": "eva-vit-g", "options": {"variant": "tiny"}},
                "connector": {"use": "qformer", "options": {"variant": "tiny"}},
                "llm": {"use": "flan-t5", "options": {"variant": "tiny"}}, "max_text_tokens": 600}
    values = config(data, tmp_path / "out", assembly=assembly)
    code, out, err = validate_cli(capsys, tmp_path, values)
    assert code == 0, err
    assert (out + err).count("beyond") == 1 and "  warning    too many tokens" in out
    code, out, err = validate_cli(capsys, tmp_path, values, "--json")
    assert code == 0 and "too many tokens" in json.loads(out)["plan"]["warnings"][0] and "warning" not in err

