"""Issue 18's errors: `train --check` checks the data files, a run leaves no `.lock` on any way out,
`train` prints its last line once and names init_from, `eval` reads a generated world with its
defaults, and a misspelt preset is reported before torch is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_trainer_samples import config, write_caption_data, write_config
from vlbridge.cli.main import main
from vlbridge.train import checkpointing
from vlbridge.train.config import check_config, read_config


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_caption_data(tmp_path_factory.mktemp("data"), images=4)


def train_cli(capsys, tmp_path: Path, values: dict, *flags: str) -> tuple[int, str, str]:
    code = main(["train", str(write_config(tmp_path / f"train-{values['stage']}.yaml", values)), *flags])
    out, err = capsys.readouterr()
    return code, out, err


# -- item 8: train --check and the lock ------------------------------------------------------------
def test_check_reports_missing_data_files(capsys, tmp_path, data):
    values = config(data, tmp_path / "out", with_eval=True)
    values["data"]["train"]["paths"] = [str(tmp_path / "missing.jsonl")]
    values["data"]["eval"]["image_root"] = str(tmp_path / "no-images")
    code, out, err = train_cli(capsys, tmp_path, values, "--check")
    assert code == 2 and "valid" not in out, out
    assert f"data.train.paths[0]: file not found: {tmp_path / 'missing.jsonl'}" in err
    assert f"data.eval.image_root: '{tmp_path / 'no-images'}' is not a directory" in err


def test_missing_webdataset_shards_are_reported(tmp_path, data):
    values = config(data, tmp_path / "out", steps=2)
    values["data"]["train"] = {"format": "webdataset", "paths": [str(tmp_path / "shard-{0000..0001}.tar")]}
    with pytest.raises(Exception, match=r"data.train.paths\[0\]: 2 shard files not found"):
        check_config(*read_config(values))


def test_a_failed_run_leaves_no_lock_and_no_empty_output_dir(tmp_path, data):
    from vlbridge.errors import VLBridgeError
    from vlbridge.train.trainer import train

    broken = tmp_path / "broken.jsonl"
    broken.write_text("not json\n", encoding="utf-8")
    values = config(data, tmp_path / "out", steps=2, schedule={"warmup_steps": 0})
    values["data"]["train"]["paths"] = [str(broken)]
    checked, label = read_config(values)
    assembly = check_config(checked, label)  # the file exists: the config is valid, the run fails on reading it
    with pytest.raises(VLBridgeError, match="broken.jsonl"):
        train(checked, assembly)
    assert not (tmp_path / "out" / checkpointing.LOCK_FILE).exists()
    assert not (tmp_path / "out").exists()


def test_the_lock_is_released_and_removed_on_every_way_out(tmp_path):
    from vlbridge.errors import VLBridgeError

    with checkpointing.exclusive(tmp_path):
        assert (tmp_path / checkpointing.LOCK_FILE).is_file()
        with pytest.raises(VLBridgeError, match="in use by another run"):
            with checkpointing.exclusive(tmp_path):
                pass
    assert not (tmp_path / checkpointing.LOCK_FILE).exists()
    with pytest.raises(KeyboardInterrupt):
        with checkpointing.exclusive(tmp_path):
            raise KeyboardInterrupt
    assert not (tmp_path / checkpointing.LOCK_FILE).exists() and tmp_path.is_dir()  # it was there before: kept
    with checkpointing.exclusive(tmp_path):  # and the directory can be locked again
        pass


# -- item 17: one final line; stage 2 says where its connector starts --------------------------------
def test_train_prints_its_last_line_once_and_stage2_names_init_from(capsys, tmp_path, data):
    first = tmp_path / "stage1"
    code, out, err = train_cli(capsys, tmp_path, config(data, first, steps=1, log_every=1, schedule={"warmup_steps": 0}))
    assert code == 0, err
    assert (out + err).count("trained to step 1") == 1 and "done at step" not in out + err
    assert "connector from scratch" in err and not (first / checkpointing.LOCK_FILE).exists()
    code, out, err = train_cli(capsys, tmp_path, config(data, tmp_path / "stage2", stage=2, steps=1, init_from=str(first), schedule={"warmup_steps": 0}))
    assert code == 0, err
    assert f"connector from {first / 'checkpoints' / 'step-1'}" in err
    assert (out + err).count("trained to step 1") == 1


# -- item 11: a generated world evaluates with the defaults ------------------------------------------
def test_vqa_eval_on_a_generated_world_finds_its_images(capsys, tmp_path):
    from vlbridge.world.config import WorldConfig
    from vlbridge.world.generate import generate_world

    world = tmp_path / "world"
    generate_world(world, WorldConfig(train=0, val=0, test=2, comp=0, image_size=32))
    code = main(["eval", "-a", "tiny-qformer-opt", "--task", "vqa", "--data", str(world / "questions_test.json"),
                 "--annotations", str(world / "annotations_test.json"), "--limit", "2", "--num-beams", "1",
                 "--max-new-tokens", "2", "--json", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "image file names from the manifest.json beside the data: images/world_{split}_{image_id:07d}.png" in err
    assert '"num_questions": 2' in out


def test_vqa_images_not_found_names_image_pattern(capsys, tmp_path):
    from vlbridge.world.config import WorldConfig
    from vlbridge.world.generate import generate_world

    world = tmp_path / "world"
    generate_world(world, WorldConfig(train=0, val=0, test=1, comp=0, image_size=32))
    (world / "manifest.json").unlink()  # e.g. the questions copied elsewhere without it
    code = main(["eval", "-a", "tiny-qformer-opt", "--task", "vqa", "--data", str(world / "questions_test.json"),
                 "--annotations", str(world / "annotations_test.json")])
    err = capsys.readouterr().err
    assert code == 2 and "world/COCO_test_" in err and "--image-pattern at the file names" in err, err


# -- item 17: a misspelt preset, before torch ------------------------------------------------------------
SCRIPT = """
import sys
from vlbridge.cli.main import main
codes = [main(argv) for argv in (["caption", "-a", "blip2-opt-2.7bb", "x.png"], ["ask", "-a", "tiny-qformer-op", "-q", "q", "x.png"],
                                 ["retrieve", "-a", "nope", "-t", "t", "x.png"],
                                 ["eval", "-a", "nope", "--task", "caption", "--data", "c.json"],
                                 ["cache-features", "-a", "nope", "--format", "coco", "--paths", "c.json", "--out", "o"])]
print("CODES", codes, "TORCH", "torch" in sys.modules, file=sys.stderr)
"""


def test_a_misspelt_preset_is_reported_before_torch_loads():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=False)
    assert "CODES [2, 2, 2, 2, 2] TORCH False" in result.stderr, result.stderr[-3000:]
    assert "Did you mean 'blip2-opt-2.7b'" in result.stderr or "blip2-opt-2.7b" in result.stderr


def test_an_unreachable_preset_is_refused_before_torch_loads(tmp_path):
    """Item 10 measured: `caption -a blip2-opt-2.7b` offline spent 42 s building a random ViT-g first."""
    script = ("import sys\nfrom vlbridge.cli.main import main\n"
              "code = main(['caption', '-a', 'blip2-opt-2.7b', 'x.png'])\n"
              "print('CODE', code, 'TORCH', 'torch' in sys.modules, file=sys.stderr)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, env=env)
    assert "CODE 2 TORCH False" in result.stderr, result.stderr[-3000:]
    assert "facebook/opt-2.7b" in result.stderr and "encoder.options.pretrained is not set" in result.stderr


@pytest.mark.parametrize("command", [["caption", "img.png"], ["eval", "--task", "caption", "--data", "d.json"]])
def test_weights_with_a_checkpoint_is_refused_by_every_model_command(capsys, tmp_path, command):
    code = main([command[0], "-c", str(tmp_path), "--weights", str(tmp_path / "w.safetensors"), *command[1:]])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--weights goes with --assembly; a --checkpoint already holds its weights" in err


def test_a_lock_held_by_a_dead_runs_children_says_so(tmp_path):
    """A run SIGKILLed a moment ago: its forked workers still hold the flock, and the message named
    the dead pid as 'another run'."""
    import multiprocessing
    import subprocess

    from vlbridge.errors import VLBridgeError

    gone = subprocess.Popen(["true"])  # a pid that has surely ended
    gone.wait()
    ready, release = multiprocessing.get_context("fork").Event(), multiprocessing.get_context("fork").Event()

    def child_holding_the_lock() -> None:  # as a forked data-loader worker holds the run's lock
        with checkpointing.exclusive(tmp_path):
            (tmp_path / checkpointing.LOCK_FILE).write_text(f"{gone.pid}\n")
            ready.set()
            release.wait(30)

    worker = multiprocessing.get_context("fork").Process(target=child_holding_the_lock)
    worker.start()
    try:
        assert ready.wait(30)
        with pytest.raises(VLBridgeError, match=f"still locked by the processes started by pid {gone.pid}, which has ended"):
            with checkpointing.exclusive(tmp_path):
                pass
    finally:
        release.set()
        worker.join(30)


def test_a_folder_as_annotation_file_and_an_interrupted_run_say_what_to_do(capsys, tmp_path, data, monkeypatch):
    values = config(data, tmp_path / "out")
    values["data"]["train"]["paths"] = [str(data)]
    code, _, err = train_cli(capsys, tmp_path, values, "--check")
    assert code == 2 and f"'{data}' is a folder; give the jsonl annotation file itself (a file)" in err
    import vlbridge.train.trainer as trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    code, _, err = train_cli(capsys, tmp_path, config(data, tmp_path / "out"))
    assert code == 130 and "interrupted; no checkpoint was saved yet, so a rerun starts over: vlbridge train " in err
    assert err.strip().splitlines()[-1].startswith("vlbridge train: interrupted;"), err  # said once, not then a bare "interrupted"
    from vlbridge.cli.train import resume_hint

    step = tmp_path / "run" / "checkpoints" / "step-3"
    step.mkdir(parents=True)
    (step / "trainer_state.pt").write_bytes(b"")
    (step.parent / "latest").write_text("step-3\n")
    assert resume_hint(str(tmp_path / "run"), "t.yaml") == f"the last checkpoint is {step}; continue from it with: vlbridge train t.yaml --resume"
    assert resume_hint(str(tmp_path / "run"), "my run.yaml").endswith("vlbridge train 'my run.yaml' --resume")  # pastes as it reads


@pytest.mark.parametrize("argv, command", [(["caption", "-a", "tiny-qformer-opt", "x.png", "--bogus"], "caption"),
                                           (["train", "x.yaml", "--bogus"], "train"),
                                           (["world", "generate", "--out", "w", "--bogus"], "world generate"),
                                           (["import", "hf-blip2", "src", "dst", "--bogus"], "import hf-blip2")])
def test_an_unknown_flag_shows_its_subcommands_usage(capsys, argv, command):
    """argparse left a subcommand's unknown flag to the top-level parser, whose usage lists commands;
    a nested one (world generate, import FORMAT) shows the innermost usage, which lists its flags."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"vlbridge {command}: error: unrecognized arguments: --bogus" in err
    assert err.startswith(f"usage: vlbridge {command} "), err


def test_check_reads_the_annotation_files(capsys, tmp_path, data):
    """--check said 'valid' for a JSONL whose lines lack the caption field training reads."""
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "caption": "a red circle"}\n', encoding="utf-8")
    values = config(data, tmp_path / "out")
    values["data"]["train"]["paths"] = [str(tmp_path / "bad.jsonl")]
    code, out, err = train_cli(capsys, tmp_path, values, "--check")
    assert code == 2 and "valid" not in out
    assert "line 1: missing required field 'text' (fields present: 'image', 'caption')" in err


# -- a listing piped into `head`: the reader leaving early is not a bug ------------------------------------
def test_a_reader_that_leaves_early_ends_the_listing_quietly():
    """`vlbridge components | head` said "internal error: BrokenPipeError ... a bug in vlbridge"."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line is written
    try:
        result = subprocess.run([sys.executable, "-m", "vlbridge", "components"], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, check=False)
    finally:
        os.close(write_end)
    assert result.returncode == 141 and result.stderr == "", (result.returncode, result.stderr[-2000:])


def test_a_broken_pipe_that_is_not_stdout_is_still_an_internal_error(capsys, monkeypatch):
    """Say, a data loader's worker pipe: that one is a bug to report, not a reader gone."""
    import argparse

    import vlbridge.cli.main as cli_main

    def broken(args: argparse.Namespace) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    class Parser:
        def parse_known_args(self, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
            return argparse.Namespace(command="presets", func=broken), []

    monkeypatch.setattr(cli_main, "build_parser", Parser)
    assert main(["presets"]) == 1
    assert "internal error: BrokenPipeError" in capsys.readouterr().err


def test_check_says_it_read_no_webdataset_sample(capsys, tmp_path, data):
    """--check printed a bare 'valid' for tar shards whose samples it never opened."""
    from tests.test_data_samples import sample_members, write_tar

    for s in range(2):
        write_tar(tmp_path / f"shard-{s}.tar", sample_members(f"{s}000", s, "a caption"))
    values = config(data, tmp_path / "out", steps=4)
    values["data"]["train"] = {"format": "webdataset", "paths": [str(tmp_path / "shard-{0..1}.tar")]}
    code, out, _ = train_cli(capsys, tmp_path, values, "--check")
    assert code == 0 and out.rstrip().endswith("valid"), out
    assert "data.train: 2 webdataset shards found; --check reads none of their samples" in out
