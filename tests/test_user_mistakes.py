"""Mistakes an outside tester made on purpose, each a clear error (exit 2 from the CLI, what is wrong
and what would be right) instead of an internal error, a silently dropped setting or advice that
loses data: generation settings and prompt templates, output paths that are files, a cache written
into a folder that is not one, half-written checkpoints after a kill, keys given twice in YAML,
refused pickles, resuming from a damaged or different run, paths `validate` can see are missing, data that
would train nothing, and comparison and demo settings checked before anything runs."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

import vlbridge
from tests.test_trainer_samples import config, write_caption_data, write_config
from vlbridge.cli.main import main
from vlbridge.errors import VLBridgeError, WeightsError
from vlbridge.files.userfiles import read_yaml
from vlbridge.files.weights import torch_load
from vlbridge.train import checkpointing

RED = Path(__file__).resolve().parents[1] / "examples" / "images" / "red-circle.png"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def assert_user_error(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    assert "internal error" not in err and "Traceback" not in err
    for phrase in expected:
        assert phrase in err, (phrase, err)


@pytest.fixture(scope="module")
def linear_opt():
    return vlbridge.build("tiny-linear-opt")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_caption_data(tmp_path_factory.mktemp("data"), images=4)


# -- generation ------------------------------------------------------------------------------------
def test_generation_settings_name_the_setting_and_its_flag(linear_opt):
    with pytest.raises(VLBridgeError, match=r"num_beams \(--num-beams\): Input should be greater than or equal to 1 \(got 0\)$"):
        linear_opt.caption(RED, num_beams=0)
    with pytest.raises(VLBridgeError, match="min_new_tokens 20 exceeds max_new_tokens 5"):
        linear_opt.caption(RED, min_new_tokens=20, max_new_tokens=5)
    with pytest.raises(VLBridgeError, match="beams: unknown setting; known: max_new_tokens"):
        linear_opt.caption(RED, beams=2)


def test_generation_past_the_llms_positions_is_refused_with_the_room_left(linear_opt):
    """The tiny OPT has 128 positions (absolute): a forward past them would fail with an index error."""
    context = linear_opt.plan.llm_dims.context_length
    with pytest.raises(VLBridgeError, match=rf"exceeds the LLM's context of {context} positions; lower max_new_tokens") as info:
        linear_opt.caption(RED, num_beams=1, max_new_tokens=10_000)
    room = int(re.search(r"at most (\d+)", str(info.value)).group(1))
    assert len(linear_opt.caption(RED, num_beams=1, max_new_tokens=room, min_new_tokens=room)) == 1  # exactly the room fits
    with pytest.raises(VLBridgeError, match="shorten the prompt"):
        linear_opt.caption(RED, prompt="word " * context, num_beams=1, max_new_tokens=1)


@pytest.mark.parametrize(("prompt", "message"), [("{} and {}", "exactly once"), ("{q} {}", "KeyError: 'q'"),
                                                  ("no slot", "exactly once"), ("{} {oops", "braces other than")])
def test_a_vqa_prompt_needs_exactly_one_slot(linear_opt, prompt, message):
    with pytest.raises(VLBridgeError, match=re.escape(message)):
        linear_opt.answer(RED, "what?", prompt=prompt)


def test_cli_counts_below_their_least_are_usage_errors(capsys):
    for argv, flag in ((["retrieve", "-a", "tiny-qformer-opt", "-t", "a", "--top", "0", str(RED)], "--top: 0 is less than 1"),
                       (["caption", "-a", "tiny-qformer-opt", "--num-beams", "-1", str(RED)], "--num-beams: -1 is less than 1"),
                       (["caption", "-a", "tiny-qformer-opt", "--min-new-tokens", "x", str(RED)], "'x' is not a whole number"),
                       (["demo", "--quick", "--queries", "0"], "--queries: 0 is less than 1")):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2 and flag in capsys.readouterr().err


def test_images_and_weights_that_are_not_there_say_what_they_are(capsys, tmp_path):
    code, err = cli(capsys, "caption", "-a", "tiny-linear-opt", str(tmp_path))
    assert_user_error(code, err, f"{tmp_path} is a directory; give image files")
    code, err = cli(capsys, "caption", "-a", "tiny-linear-opt", "--weights", str(tmp_path / "nope.safetensors"), str(RED))
    assert_user_error(code, err, "no such file or directory; expected a connector weights file (.safetensors")


# -- output paths, caches and checkpoints ----------------------------------------------------------
def test_an_output_path_that_is_a_file_is_a_user_error(capsys, tmp_path, data):
    taken = tmp_path / "taken.yaml"
    taken.write_text("a file\n", encoding="utf-8")
    code, err = cli(capsys, "cache-features", "-a", "tiny-qformer-opt", "--format", "jsonl", "--paths",
                    str(data / "train.jsonl"), "--out", str(taken), "--num-workers", "0")
    assert_user_error(code, err, f"cannot create a directory at or under {taken}: a file stands in the way")
    code, err = cli(capsys, "train", str(write_config(tmp_path / "t.yaml", config(data, taken, steps=3))))
    assert_user_error(code, err, "output_dir: ", "is a file; give a folder")  # said by the config check, before anything loads
    assert taken.read_text(encoding="utf-8") == "a file\n"


def test_a_cache_is_never_written_over_a_folder_that_is_not_a_cache(capsys, tmp_path, data):
    folder = tmp_path / "world"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"world": 1}', encoding="utf-8")
    (folder / "captions_train.json").write_text("[]", encoding="utf-8")
    for flags in ((), ("--overwrite",)):
        code, err = cli(capsys, "cache-features", "-a", "tiny-qformer-opt", "--format", "jsonl", "--paths",
                        str(data / "train.jsonl"), "--out", str(folder), "--num-workers", "0", *flags)
        assert_user_error(code, err, "holds files that a feature cache does not write (captions_train.json)", "new or empty directory")
    assert (folder / "manifest.json").read_text(encoding="utf-8") == '{"world": 1}'


def test_the_next_run_removes_checkpoints_a_killed_save_left_half_written(tmp_path):
    staging = tmp_path / checkpointing.CHECKPOINTS / ".step-41.y6gzv4ad.tmp"
    staging.mkdir(parents=True)
    (staging / ".connector.safetensors.abc.tmp").write_bytes(b"partial")
    kept = tmp_path / checkpointing.CHECKPOINTS / "step-40"
    kept.mkdir()
    with checkpointing.exclusive(tmp_path):
        assert not staging.exists() and kept.is_dir()


def test_resume_from_a_damaged_latest_names_the_newest_complete_checkpoint(capsys, tmp_path, data):
    values = config(data, tmp_path / "run", steps=4, save_every=2, keep_last=3)
    path = write_config(tmp_path / "t.yaml", values)
    assert main(["train", str(path)]) == 0
    (tmp_path / "run" / checkpointing.CHECKPOINTS / "step-4" / checkpointing.TRAINER_STATE).unlink()
    code, err = cli(capsys, "train", str(path), "--resume")
    assert_user_error(code, err, "names step-4, which is not a complete checkpoint",
                      "to resume from the newest complete one, step-2, write that name into")


def test_resume_with_another_assembly_says_what_differs(capsys, tmp_path, data):
    assert main(["train", str(write_config(tmp_path / "a.yaml", config(data, tmp_path / "run", steps=3)))]) == 0
    other = write_config(tmp_path / "b.yaml", config(data, tmp_path / "run", steps=4, assembly="tiny-qformer-flan-t5"))
    code, err = cli(capsys, "train", str(other), "--resume")
    assert_user_error(code, err, "other assembly settings than this config (assembly: 'tiny-qformer-opt' in the checkpoint, "
                                 "'tiny-qformer-flan-t5' now)")


# -- files -----------------------------------------------------------------------------------------
def test_a_key_given_twice_in_yaml_is_an_error_but_merge_keys_still_work(tmp_path, capsys):
    twice = tmp_path / "twice.yaml"
    twice.write_text("name: x\nencoder: {use: eva-vit-g}\nencoder: {use: clip-vit-l}\nconnector: {use: linear}\n", encoding="utf-8")
    code, err = cli(capsys, "validate", str(twice))
    assert_user_error(code, err, "the key 'encoder' is given twice in one mapping (lines 2 and 3); keep one of them")
    merged = tmp_path / "merged.yaml"
    merged.write_text("base: &b {use: opt, options: {variant: tiny}}\nllm:\n  <<: *b\n  use: flan-t5\n", encoding="utf-8")
    assert read_yaml(merged, "t") == {"base": {"use": "opt", "options": {"variant": "tiny"}},
                                      "llm": {"use": "flan-t5", "options": {"variant": "tiny"}}}


class Shout:
    def __reduce__(self):
        return (print, ("PWNED",))


@pytest.mark.parametrize("zipped", [True, False])
def test_a_refused_pickle_is_one_plain_sentence_and_never_runs(tmp_path, capsys, zipped):
    path = tmp_path / "evil.pth"
    if zipped:
        torch.save({"w": Shout()}, path)
    else:
        path.write_bytes(pickle.dumps({"w": Shout()}, protocol=4))
    with pytest.raises(WeightsError) as info:
        torch_load(path)
    message = str(info.value)
    assert "\x1b[" not in message and "\n" not in message and "weights_only set to False" not in message
    assert message.startswith(f"{str(path)!r} is refused: it holds ") and "re-save its tensors alone" in message
    if zipped:
        assert "a pickled 'builtins.print'" in message or "a pickled 'print'" in message
    assert "PWNED" not in capsys.readouterr().out


def test_validate_reports_a_local_weights_path_that_does_not_exist(tmp_path, capsys):
    assembly = tmp_path / "a.yaml"
    missing = tmp_path / "nowhere.pth"
    assembly.write_text(f"name: x\nencoder: {{use: eva-vit-g, options: {{variant: tiny, pretrained: {missing}}}}}\n"
                        "connector: {use: linear}\nllm: {use: opt, options: {variant: tiny}}\n", encoding="utf-8")
    code, err = cli(capsys, "validate", str(assembly))
    assert_user_error(code, err, f"encoder.options.pretrained '{missing}' does not exist")


def test_a_caption_line_with_empty_text_is_named(tmp_path):
    from vlbridge.data.jsonl import read_jsonl
    from vlbridge.data.records import DataError

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"image": "a.png", "text": "a red circle"}\n{"image": "b.png", "text": "  "}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: field 'text' is empty; give the image's caption, or drop the line"):
        read_jsonl(path)
    path.write_text('{"image": "b.png", "text": "", "text_input": "what?", "text_output": "red"}\n', encoding="utf-8")
    assert read_jsonl(path)[0].extra["text_output"] == "red"  # instruction data need no caption


def test_a_checkpoint_keeps_no_path_relative_to_where_it_was_written(tmp_path, monkeypatch):
    """An assembly's relative paths are read against the current directory; a saved checkpoint that
    kept them would load only from there."""
    source = vlbridge.build("tiny-linear-opt")
    (tmp_path / "work").mkdir()
    source.llm.model.save_pretrained(tmp_path / "work" / "opt-dir")
    source.llm.tokenizer.save_pretrained(tmp_path / "work" / "opt-dir")
    monkeypatch.chdir(tmp_path / "work")
    assembly = {"name": "rel", "encoder": {"use": "eva-vit-g", "options": {"variant": "tiny"}}, "connector": {"use": "linear"},
                "llm": {"use": "opt", "options": {"variant": "tiny", "model": "./opt-dir"}}}
    model = vlbridge.build(assembly)
    saved = model.save(tmp_path / "ckpt")
    assert read_yaml(saved / "assembly.yaml", "t")["llm"]["options"]["model"] == str(tmp_path / "work" / "opt-dir")
    monkeypatch.chdir(tmp_path)
    again = vlbridge.load(saved)
    assert again.caption(RED, num_beams=1, max_new_tokens=3) == model.caption(RED, num_beams=1, max_new_tokens=3)


# -- data that trains nothing, comparison configs checked before anything runs ---------------------
def test_a_step_whose_every_image_is_unreadable_stops_the_run(tmp_path, capsys):
    rows = "".join('{"image": "%s", "text": "a red square"}\n' % (tmp_path / f"missing{i}.png") for i in range(4))
    (tmp_path / "broken.jsonl").write_text(rows, encoding="utf-8")
    values = config(tmp_path, tmp_path / "run", steps=1, batch_size=2, schedule={"warmup_steps": 0})
    values["data"] = {"train": {"format": "jsonl", "paths": [str(tmp_path / "broken.jsonl")], "num_workers": 0}}
    path = write_config(tmp_path / "train.yaml", values)
    code, err = cli(capsys, "train", str(path))
    assert_user_error(code, err, "step 1: every sample drawn for it was skipped", "unreadable image: 2", "train on nothing")
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))


def test_a_feature_cache_of_no_readable_image_is_refused(tmp_path, capsys):
    (tmp_path / "broken.jsonl").write_text('{"image": "%s", "text": "a red square"}\n' % (tmp_path / "gone.png"), encoding="utf-8")
    code, err = cli(capsys, "cache-features", "-a", "tiny-qformer-opt", "--format", "jsonl", "--paths", str(tmp_path / "broken.jsonl"),
                    "--out", str(tmp_path / "cache"))
    assert_user_error(code, err, "none of the data's 1 images could be read", "gone.png")


@pytest.mark.parametrize("change, expected", [
    ({"stage2_data": {"format": "coco", "paths": 5}}, "stage2_data: paths: Input should be a valid list (got 5)"),
    ({"seeds": [0, 0]}, "seeds: each seed once"),
    ({"seeds": [-1]}, "seeds.0: Input should be greater than or equal to 0"),
    ({"lr": float("inf")}, "lr: Input should be a finite number"),
    ({"evals": [{"name": "val", "captions": "c.json", "tasks": ["captions"]}]}, "evals.0.tasks.0: Input should be 'caption', 'vqa' or"),
    ({"evals": [{"name": "val", "captions": "c.json", "tasks": []}]}, "evals.0.tasks: empty and no lmms_eval"),
    ({"evals": [{"name": "val", "bogus": 1}]}, "evals.0.bogus: unknown key; valid keys are: name, captions"),
    ({"evals": []}, "evals: none given, so no run would be scored"),  # it trained every run and reported nothing
])
def test_comparison_configs_are_checked_before_anything_runs(tmp_path, capsys, change, expected):
    base = {"runs": [{"name": "mlp", "assembly": "tiny-mlp-opt", "stage2_steps": 1}], "output_dir": str(tmp_path / "out"),
            "stage2_data": {"format": "jsonl", "paths": [str(tmp_path / "train.jsonl")]},
            "evals": [{"name": "val", "captions": str(tmp_path / "val.json"), "tasks": ["caption"]}]}
    path = write_config(tmp_path / "compare.yaml", {**base, **change})
    code, err = cli(capsys, "compare", str(path))
    assert_user_error(code, err, expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seeds, expected", [(["-1"], "--seeds: -1 is less than 0"), (["0", "0"], "--seeds: give each seed once")])
def test_demo_seeds_are_checked_before_the_world_is_made(tmp_path, capsys, seeds, expected):
    try:
        code = main(["demo", "--out", str(tmp_path / "demo"), "--seeds", *seeds])
    except SystemExit as exc:  # argparse's own check
        code = exc.code
    assert_user_error(code, capsys.readouterr().err, expected)
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("change, expected", [
    ({"device": "banana"}, "runs.0 (mlp), stage 2: device: 'banana' is not a device"),
    ({"stage2_objective": {"bogus": 1}}, "runs.0 (mlp), stage 2: objective.bogus: unknown key"),
    ({"runs": [{"name": "mlp", "assembly": "tiny-mlp-opt", "stage2_steps": 1, "init_from": "/nowhere"}]}, "init_from: '/nowhere' is not"),
    ({"evals": [{"name": "val", "captions": "/nowhere.json"}]}, "evals.0.captions: file not found: /nowhere.json"),
    ({"evals": [{"name": "val", "captions": "CAPTIONS", "tasks": ["caption", "vqa"]}]},
     "evals.0.tasks: vqa reads questions and annotations, which the split does not give"),
    ({"evals": [{"name": "val", "questions": "CAPTIONS", "image_pattern": "{bogus}.png"}]}, "evals.0.image_pattern: image_pattern '{bogus}.png' must use"),
    ({"generation": {"num_beams": 0}}, "generation: num_beams"),
    # default tasks, but no file any of them reads: every run trained, then an empty table
    ({"evals": [{"name": "val", "images": "."}]}, "evals.0: gives no captions, questions or lmms_eval, so none of its tasks"),
])
def test_a_comparison_names_what_its_runs_and_splits_would_refuse_before_training(tmp_path, capsys, data, change, expected):
    base = {"runs": [{"name": "mlp", "assembly": "tiny-mlp-opt", "stage2_steps": 1}], "output_dir": str(tmp_path / "out"),
            "stage2_data": {"format": "jsonl", "paths": [str(data / "train.jsonl")], "image_root": str(data)},
            "evals": [{"name": "val", "captions": "CAPTIONS", "tasks": ["caption"]}]}
    values = yaml_safe({**base, **change}).replace("CAPTIONS", str(data / "val.jsonl"))
    (tmp_path / "compare.yaml").write_text(values, encoding="utf-8")
    code, err = cli(capsys, "compare", str(tmp_path / "compare.yaml"))
    assert_user_error(code, err, "the comparison cannot run as configured", expected)
    assert not (tmp_path / "out" / "features").exists() and not list((tmp_path / "out").glob("runs/*"))


def yaml_safe(values: dict) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False)


@pytest.mark.parametrize("argv, expected", [
    (["caption", "-a", "tiny-qformer-opt", "--sample", "--num-beams", "3", str(RED)], "--sample draws one continuation"),
    (["ask", "-a", "tiny-qformer-opt", "-q", " ", str(RED)], "--question/-q: question 1 is empty"),
    (["retrieve", "-a", "tiny-qformer-opt", "-t", "a red circle", "-t", "", str(RED)], "--text/-t: text 2 is empty"),
    (["validate", "--train", "x.yaml", "--plan-only", "--gpu-memory", "40"], "--gpu-memory: '40' is not a size with its unit"),
])
def test_flags_that_would_be_ignored_or_mean_nothing_are_refused(capsys, argv, expected):
    code, err = cli(capsys, *argv)
    assert_user_error(code, err, expected)


def test_true_is_not_a_number_in_any_config(tmp_path, capsys):
    from vlbridge.plugins.connectors.qformer import QFormerOptions

    with pytest.raises(ValueError, match="expected a number, got True"):
        QFormerOptions(num_query_tokens=True)
    assert QFormerOptions(num_query_tokens=8).num_query_tokens == 8
    assembly = tmp_path / "a.yaml"
    assembly.write_text("name: x\nencoder: {use: eva-vit-g, options: {variant: tiny}}\n"
                        "connector: {use: qformer, options: {variant: tiny, num_query_tokens: true}}\nllm: {use: opt, options: {variant: tiny}}\n")
    code, err = cli(capsys, "validate", str(assembly))
    assert_user_error(code, err, "connector.options.num_query_tokens: expected a number, got True")


def test_train_check_sees_an_empty_init_from_and_a_file_for_output_dir(tmp_path, capsys, data):
    (tmp_path / "empty").mkdir()
    (tmp_path / "taken").write_text("x")
    values = config(data, tmp_path / "taken", init_from=str(tmp_path / "empty"))
    code, err = cli(capsys, "train", "--check", str(write_config(tmp_path / "train.yaml", values)))
    assert_user_error(code, err, "init_from: ", "holds no checkpoint (no checkpoint.json, no checkpoints/)",
                      "output_dir: ", "is a file; give a folder")


def test_checkpoint_files_that_are_not_what_they_claim_are_named(tmp_path, linear_opt):
    import json

    ckpt = linear_opt.save(tmp_path / "ckpt")
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    for change, message in (({"format": "pytorch"}, "'format' is 'pytorch', not 'vlbridge-checkpoint'"),
                            ({"version": 99}, "version 99 is not one this vlbridge reads"),
                            ({"stage": 7}, "checkpoint.json': 'stage' must be the training stage (1 or 2), found 7")):
        (ckpt / "checkpoint.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(WeightsError, match=re.escape(message)):
            vlbridge.load(ckpt)
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))
    (ckpt / "connector.safetensors").unlink()
    (ckpt / "connector.safetensors").mkdir()
    with pytest.raises(WeightsError, match="connector.safetensors is a directory; expected the weights file itself"):
        vlbridge.load(ckpt)


def test_a_file_named_as_a_feature_cache_is_called_a_file(tmp_path):
    from vlbridge.train.cache import CacheError, read_manifest

    (tmp_path / "fake.png").write_bytes(b"png")
    with pytest.raises(CacheError, match="is a file; give the folder vlbridge cache-features --out wrote"):
        read_manifest(tmp_path / "fake.png")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text("[]")
    with pytest.raises(CacheError, match="cannot be read as a manifest"):
        read_manifest(tmp_path / "cache")


@pytest.mark.parametrize("argv, expected", [
    (["cache-features", "-a", "tiny-qformer-opt", "--format", "jsonl", "--paths", "x.jsonl", "--split", "train", "--out", "c"],
     "--split picks a split of a coco (Karpathy) or vqa file; --format jsonl has none"),
    (["world", "generate", "--out", "w", "--train", "10000000000000"], "--train: Input should be less than or equal to 1000000"),
])
def test_settings_named_by_the_flag_the_user_typed(tmp_path, monkeypatch, capsys, argv, expected):
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, *argv)
    assert_user_error(code, err, expected)
    assert not (tmp_path / "w").exists()


def test_a_stage1_checkpoint_in_a_comparison_is_refused_for_text_tasks_before_anything_runs(tmp_path, data):
    from vlbridge.compare.config import CompareConfig
    from vlbridge.compare.preflight import preflight

    stage1 = vlbridge.build("tiny-qformer-opt", stage=1).save(tmp_path / "s1")
    split = {"name": "val", "captions": str(data / "val.jsonl")}

    def config(**tasks) -> CompareConfig:
        return CompareConfig.model_validate({"runs": [{"name": "s1", "checkpoint": str(stage1)}], "output_dir": str(tmp_path / "out"),
                                             "evals": [{**split, **tasks}]})

    with pytest.raises(VLBridgeError, match="is a stage-1 checkpoint: it has no trained projection into an LLM, so it cannot be "
                                            "scored on caption"):
        preflight(config())  # by default the split's captions are captioned and retrieved
    preflight(config(tasks=["retrieval"]))  # retrieval is what a stage-1 checkpoint does
