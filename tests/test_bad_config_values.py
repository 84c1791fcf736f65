"""Values a config fuzzer put into every field of the example configs and presets that were taken, or
crashed: `stage: true` and an assembly's `max_text_tokens: true` read as 1, whole numbers past int64
(`steps`, `num_query_tokens`) validated, a string too long to be a file name was an internal
OSError wherever it was asked about as a path, a captions file given as `--scenes` / `evals.N.scenes`
was a KeyError once scoring began, and cache-features loaded the encoder before saying that a data
file does not exist. Each is now a usage error (exit 2) naming the field, before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_trainer_samples import config, write_caption_data, write_config
from vlbridge.cli.main import main
from vlbridge.errors import VLBridgeError
from vlbridge.files.config_fields import MAX_INT
from vlbridge.train.config import TrainConfigError, read_config

HUGE = 10**30
TINY_ASSEMBLY = ("name: x\nencoder: {use: eva-vit-g, options: {variant: tiny}}\n"
                 "connector: {use: qformer, options: {variant: tiny, num_query_tokens: 8}}\nllm: {use: opt, options: {variant: tiny}}\n")


def usage_error(capsys: pytest.CaptureFixture[str], argv: list[str], *expected: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "internal error" not in err and "Traceback" not in err
    for phrase in expected:
        assert phrase in err, (phrase, err)
    return err


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_caption_data(tmp_path_factory.mktemp("data"), images=4)


def test_true_is_not_a_stage(tmp_path, data):
    with pytest.raises(TrainConfigError, match=r"stage: expected a number, got True"):
        read_config(config(data, tmp_path / "run", stage=True))


def test_true_is_not_an_assemblys_max_text_tokens(tmp_path, capsys):
    path = tmp_path / "a.yaml"
    path.write_text(TINY_ASSEMBLY + "max_text_tokens: true\n", encoding="utf-8")
    usage_error(capsys, ["validate", str(path)], "max_text_tokens: expected a number, got True")


@pytest.mark.parametrize("key", ["steps", "batch_size", "log_every"])
def test_a_count_past_int64_is_refused(tmp_path, data, key):
    with pytest.raises(TrainConfigError, match=rf"{key}: Input should be less than or equal to {MAX_INT}, int64's limit"):
        read_config(config(data, tmp_path / "run", **{key: HUGE}))
    assert read_config(config(data, tmp_path / "run", steps=MAX_INT))[0].steps == MAX_INT


def test_a_component_option_past_int64_is_refused(tmp_path, capsys):
    path = tmp_path / "a.yaml"
    path.write_text(TINY_ASSEMBLY.replace("num_query_tokens: 8", f"num_query_tokens: {HUGE}"), encoding="utf-8")
    usage_error(capsys, ["validate", str(path)], "num_query_tokens: Input should be less than or equal to", "(got 1e+30)")


def test_a_path_too_long_for_the_file_system_is_a_usage_error(tmp_path, capsys):
    """A plugin's option read as a path (here the Q-Former's bert): the CLI names the start of it."""
    assembly = tmp_path / "a.yaml"
    assembly.write_text(TINY_ASSEMBLY.replace("num_query_tokens: 8", f"bert: {'x' * 300}"), encoding="utf-8")
    usage_error(capsys, ["validate", str(assembly)], "is too long for the file system", "(300 characters)")


def test_config_paths_no_file_system_can_hold_are_named_with_their_field(tmp_path, capsys, data):
    from vlbridge.compare.config import CompareConfig
    from vlbridge.data.config import load_data_config
    from vlbridge.data.records import DataConfigError

    long = "x" * 300
    values = config(data, tmp_path / "o\0x", init_from=long)
    values["data"]["train"]["paths"] = [f"a/{long}"]
    usage_error(capsys, ["train", str(write_config(tmp_path / "t.yaml", values)), "--check"],
                "output_dir: ", "holds a NUL byte", "init_from: the name 'xxxx", "is 300 bytes, longer than a file or folder name",
                "data.train.paths.0: the name")
    with pytest.raises(DataConfigError, match=r"data.image_root: the name 'xxx.*is 300 bytes"):
        load_data_config({"format": "coco", "paths": ["a.json"], "image_root": long})
    with pytest.raises(ValueError, match=r"evals.0.scenes\n.*the name 'xxx"):
        CompareConfig.model_validate({"runs": [{"name": "a", "assembly": "tiny-mlp-opt", "stage2_steps": 1}], "output_dir": "o",
                                      "evals": [{"name": "test", "captions": "c.json", "scenes": long}]})


def test_a_shard_url_or_pipe_command_is_not_held_to_a_file_name_length():
    """A signed object-store URL's query runs past 255 bytes after its last '/': it names no file, so
    webdataset's URLs and pipe: commands take any length (a NUL byte is still refused)."""
    from vlbridge.data.config import load_data_config
    from vlbridge.data.records import DataConfigError

    signed = "https://bucket.example.com/laion/{00000..00009}.tar?X-Amz-Signature=" + "f" * 300
    for path in (signed, f"pipe:curl -s '{signed}'", f"pipe:cat a.tar::{signed}"):
        assert load_data_config({"format": "webdataset", "paths": [path]}).paths == [path]
    with pytest.raises(DataConfigError, match=r"data.paths.0: 'pipe:cat a\\x00.tar' holds a NUL byte"):
        load_data_config({"format": "webdataset", "paths": ["pipe:cat a\0.tar"]})
    with pytest.raises(DataConfigError, match=r"data.paths.0: the name 'xxx.*is 304 bytes"):
        load_data_config({"format": "webdataset", "paths": ["shards/" + "x" * 300 + ".tar"]})


def test_a_captions_file_given_as_scenes_is_named(tmp_path):
    from vlbridge.compare.config import EvalSet
    from vlbridge.compare.preflight import eval_problems
    from vlbridge.evaluation.scenes import read_scenes

    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps([{"image": "a.png", "caption": "a red circle", "image_id": 1}]), encoding="utf-8")
    with pytest.raises(VLBridgeError, match=r"record \[0\]: not a scene \(found \['caption', 'image', 'image_id'\]\)"):
        read_scenes(str(captions))
    split = EvalSet(name="test", captions=str(captions), scenes=str(captions), images=str(tmp_path))
    assert any(p.startswith("evals.0.scenes: ") and "not a scene" in p for p in eval_problems(split, "evals.0"))
    scenes = tmp_path / "scenes.json"
    scenes.write_text(json.dumps([{"image_id": 1, "objects": [{"shape": "circle", "dx": 1}]}]), encoding="utf-8")
    assert read_scenes(str(scenes)) == {1: [{"shape": "circle", "dx": 1}]}


def test_cache_features_names_a_missing_data_file_before_the_encoder_loads(tmp_path, capsys, monkeypatch):
    import vlbridge.train.cache_build as cache_build

    def no_build(*args, **kwargs):
        raise AssertionError("the encoder was built before the data files were checked")

    monkeypatch.setattr(cache_build, "build_encoder", no_build)
    spec = write_config(tmp_path / "d.yaml", {"format": "coco", "paths": [str(tmp_path / "nothing.json")]})
    usage_error(capsys, ["cache-features", "-a", "tiny-qformer-opt", "--data", str(spec), "--out", str(tmp_path / "cache")],
                "d.yaml.paths[0]: file not found:")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_assembly_name_is_called_empty(capsys, name):
    """Path('') is the working directory: `validate ''` said " is a directory"."""
    usage_error(capsys, ["validate", name], "the assembly is an empty name; give an assembly YAML file or a preset name")


@pytest.mark.parametrize("positions, phrase", [([-1], "greater than or equal to 0"), ([0, 0], "list each caption position once"),
                                               ([], "at least 1 item")])
def test_compare_retrieval_caption_positions_are_each_given_once_from_0(positions, phrase):
    """A negative position counted from the end (or an IndexError past it), a repeated one counted its
    caption twice in the recall, and an empty list failed on the first image; compare's config took all three."""
    from pydantic import ValidationError

    from vlbridge.compare.config import EvalSet

    with pytest.raises(ValidationError, match=phrase):
        EvalSet(name="test", captions="captions.json", tasks=["retrieval"], retrieval_captions=positions)
