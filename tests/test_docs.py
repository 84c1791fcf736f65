"""The docs test: every bash, python and yaml block of README.md, docs/*.md and examples/ (READMEs,
and the commands in the example configs' comments) runs as written, offline, in a folder laid out
like the repository root a reader works in, so that a documented command that breaks fails CI.

- `vlbridge ...` commands run in this process through the console script's own `main` (one torch
  import for all of them); `python -m vlbridge ...` and python blocks run in a subprocess.
- `pip install` commands are not run: their paths and extras are checked against the repository.
- The example training and comparison configs are copied into the workspace cut to a few steps on
  a few images (`within_budget`: same keys, same paths); commands that name a step's checkpoint
  follow (`BUDGET_COMMANDS`). Commands too costly for CI even so run elsewhere (`RUN_ELSEWHERE`,
  each naming where); they are still parsed by vlbridge's own argument parser.
- yaml blocks are validated: assemblies by `vlbridge validate`, training, comparison and
  `finetune:` configs by their pydantic models.
- A block under `<!-- docs-test: skip (reason) -->` is skipped with that reason (`pytest -rs`
  lists them).
Identical commands run once per workspace (a world generated or a stage-1 run trained by one block
serves the next): the shared artefacts of a train-then-caption sequence.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from tests.doc_blocks import Block, DocsMarkupError, documented_blocks, markdown_blocks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
BLOCKS = documented_blocks(REPO)
BUDGET_STEPS = 4
SHELL_OPERATORS = {"|", "||", ";", "&", ">", ">>", "<"}
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

# Commands out of CI's budget as written, and where their equivalent runs instead.
RUN_ELSEWHERE: dict[str, str] = {
    "vlbridge demo": "tests/test_demo.py runs `vlbridge demo --quick` (the full demo takes about 4 minutes on 2 cores: README, 'Install and run')",
    "python -m pytest -q": "the test suite itself, which CI runs (this test is part of it)",
    "torchrun --nproc_per_node 2 -m vlbridge train examples/train-stage2-tiny.yaml":
        "two processes: tests/test_trainer_ddp.py trains on two gloo ranks with torchrun's environment",
}
# Checkpoints are named by their step: commands that name one follow the budget configs.
BUDGET_COMMANDS = {"checkpoints/step-200": f"checkpoints/step-{BUDGET_STEPS}"}
# Examples that start from another's results, as their comments say ("after that run").
PREREQUISITES = {"examples/train-stage2-tiny.yaml (comments)": "examples/train-stage1-tiny.yaml (comments)"}


def within_budget(config: dict[str, Any]) -> dict[str, Any]:
    """A training or comparison config cut to a few steps on a few images, every key and path kept."""
    if "runs" in config:
        for run in config["runs"]:
            run.update({k: 2 for k in ("stage1_steps", "stage2_steps") if k in run})
        config.update(seeds=[0], batch_size=4, warmup_steps=1, jobs=1)  # results do not depend on jobs
        for key in ("stage1_data", "stage2_data"):
            config[key].update(limit=16, num_workers=0)  # a loader's worker processes take seconds to stop
        for eval_set in config.get("evals", []):
            eval_set["limit"] = 4
    elif "stage" in config:
        config.update(steps=BUDGET_STEPS, batch_size=4)
        config.update({k: 2 for k in ("log_every", "eval_every", "save_every") if k in config})
        config.get("schedule", {}).update(warmup_steps=1)
        for section in config["data"].values():
            if isinstance(section, dict):
                section.update(num_workers=0, **({"limit": 8} if "limit" in section else {}))
    return config


def check_install(argv: list[str]) -> None:
    """`pip install [-e] TARGET...`: every target is a project of this repository with those extras."""
    targets = [a for a in argv[argv.index("install") + 1:] if not a.startswith("-")]
    assert targets, f"`{shlex.join(argv)}` installs nothing"
    for target in targets:
        path, _, extras = target.partition("[")
        pyproject = REPO / path / "pyproject.toml"
        assert pyproject.is_file(), f"`{shlex.join(argv)}`: {path!r} is not a project of this repository (no {pyproject})"
        declared = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"].get("optional-dependencies", {})
        for extra in filter(None, extras.rstrip("]").split(",")):
            assert extra.strip() in declared, (f"`{shlex.join(argv)}`: {path!r} has no extra {extra!r}; "
                                               f"its extras are {sorted(declared)}")


def check_arguments(argv: list[str]) -> None:
    """vlbridge's own parser accepts the command's arguments (argparse exits 2 otherwise)."""
    from vlbridge.cli.main import build_parser

    args = argv[argv.index("vlbridge") + 1:]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"`{shlex.join(argv)}`: vlbridge's parser refuses it (exit {exc.code}): {err.getvalue()}")


def commands_of(text: str) -> list[list[str]]:
    """A bash block's commands: one per line, `&&` separating more; comments dropped."""
    commands: list[list[str]] = []
    for line in text.splitlines():
        tokens = shlex.split(line, comments=True)
        assert not SHELL_OPERATORS & set(tokens), f"{line!r}: the docs test runs plain commands and `&&` chains only"
        while tokens:
            end = tokens.index("&&") if "&&" in tokens else len(tokens)
            commands.append(tokens[:end])
            tokens = tokens[end + 1:]
    return commands


def in_process(args: list[str], cwd: Path) -> tuple[int, str]:
    """`vlbridge ARGS` as the console script runs it, in `cwd`, with its output captured."""
    from vlbridge.cli.main import main

    out = io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue()


def in_subprocess(argv: list[str], cwd: Path) -> tuple[int, str]:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600, env={**os.environ, **OFFLINE})
    return proc.returncode, proc.stdout + proc.stderr


class Workspace:
    """A folder laid out like the repository root: examples/ (its configs within budget) and every
    file a doc block names in its first line (`# my-assembly.yaml`), as a reader would save it."""

    def __init__(self, root: Path):
        self.root = root
        self.ran: dict[str, str] = {}  # command -> its output: identical commands run once
        shutil.copytree(REPO / "examples", root / "examples", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        for path in (root / "examples").glob("*.yaml"):
            path.write_text(yaml.safe_dump(within_budget(yaml.safe_load(path.read_text(encoding="utf-8")))), encoding="utf-8")
        for block in BLOCKS:
            if block.file:
                (root / block.file).parent.mkdir(parents=True, exist_ok=True)
                (root / block.file).write_text(block.text, encoding="utf-8")

    def run(self, argv: list[str]) -> str:
        command = shlex.join(argv)
        if command not in self.ran:
            self.ran[command] = self._run(argv)
        return self.ran[command]

    def _run(self, argv: list[str]) -> str:
        command = shlex.join(argv)
        if "vlbridge" in argv:
            check_arguments(argv)
        if "install" in argv and "pip" in argv[:3]:
            check_install(argv)
            return "checked, not installed"
        if command in RUN_ELSEWHERE:
            return RUN_ELSEWHERE[command]
        budget = [_within_budget_arg(a) for a in argv]
        if budget[0] == "vlbridge":
            code, out = in_process(budget[1:], self.root)
        elif budget[:3] == ["python", "-m", "vlbridge"]:
            code, out = in_subprocess([sys.executable, *budget[1:]], self.root)
        else:
            pytest.fail(f"`{command}`: the docs test runs vlbridge, `python -m vlbridge` and pip install commands; "
                        "give this one a rule in tests/test_docs.py")
        assert code == 0, f"`{command}` exited {code} in {self.root}:\n{out[-4000:]}"
        return out


def _within_budget_arg(arg: str) -> str:
    for old, new in BUDGET_COMMANDS.items():
        arg = arg.replace(old, new)
    return arg


def run_bash(block: Block, workspace: Workspace) -> None:
    for argv in commands_of(block.text):
        workspace.run(argv)


def run_python(block: Block, workspace: Workspace) -> None:
    """A snippet runs as a script; a file block (`# pkg/module.py`) as the module it says it is."""
    if block.file:
        argv = [sys.executable, "-m", block.file.removesuffix(".py").replace("/", ".")]
    else:
        argv = [sys.executable, "-c", block.text]
    code, out = in_subprocess(argv, workspace.root)
    assert code == 0, f"{block.source}: the python block exited {code}:\n{out[-4000:]}"


def check_yaml(block: Block, workspace: Workspace) -> None:
    config = yaml.safe_load(block.text)
    assert isinstance(config, dict), f"{block.source}: a yaml block that is not a mapping"
    if {"encoder", "connector", "llm"} <= config.keys():
        path = workspace.root / (block.file or f"{block.source.replace('/', '_').replace(':', '_')}.yaml")
        path.write_text(block.text, encoding="utf-8")
        workspace.run(["vlbridge", "validate", str(path)])
    elif "runs" in config:
        from vlbridge.compare import CompareConfig

        CompareConfig.model_validate(config)
    elif {"assembly", "stage"} <= config.keys():
        from vlbridge.train.config import TrainConfig

        TrainConfig.model_validate(config)
    elif config.keys() == {"finetune"}:
        from vlbridge.train.finetune_config import FinetuneConfig

        FinetuneConfig.model_validate(config["finetune"])
    elif config.keys() == {"data"}:  # a training config's data section on its own
        from vlbridge.train.config import DataSection

        DataSection.model_validate(config["data"])
    else:
        pytest.fail(f"{block.source}: a yaml block the docs test cannot check (keys {sorted(config)}); "
                    "make it an assembly, a training, comparison, finetune or data config, or mark it skipped with a reason")


RUNNERS: dict[str, Callable[[Block, Workspace], None]] = {"bash": run_bash, "python": run_python, "yaml": check_yaml}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """One checkout for every doc, as one reader following them all has (offline throughout)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in OFFLINE.items():
            patch.setenv(key, value)
        yield Workspace(tmp_path_factory.mktemp("docs"))


@pytest.mark.parametrize("block", BLOCKS, ids=[b.source for b in BLOCKS])
def test_documented_block_runs(block: Block, workspace: Workspace):
    if block.skip:
        pytest.skip(f"{block.source}: {block.skip}")
    if block.source in PREREQUISITES:
        (before,) = [b for b in BLOCKS if b.source == PREREQUISITES[block.source]]
        RUNNERS[before.lang](before, workspace)
    RUNNERS[block.lang](block, workspace)


def test_sample_images_are_what_their_readme_draws(tmp_path: Path):
    """examples/images/*.png are not opaque files: their README's snippet draws the same pixels."""
    from PIL import Image, ImageChops

    (snippet,) = [b for b in BLOCKS if b.source.startswith("examples/images/README.md") and b.lang == "python"]
    (tmp_path / "examples" / "images").mkdir(parents=True)
    code, out = in_subprocess([sys.executable, "-c", snippet.text], tmp_path)
    assert code == 0, out
    shipped = sorted(p.name for p in (REPO / "examples" / "images").glob("*.png"))
    assert shipped and sorted(p.name for p in (tmp_path / "examples" / "images").glob("*.png")) == shipped
    for name in shipped:
        with Image.open(REPO / "examples" / "images" / name) as a, Image.open(tmp_path / "examples" / "images" / name) as b:
            assert ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getbbox() is None, name


def test_every_rule_names_a_documented_command():
    """A rule for a command the docs no longer give is stale: it would hide a renamed command."""
    commands = {shlex.join(c) for b in BLOCKS if b.lang == "bash" for c in commands_of(b.text)}
    assert set(RUN_ELSEWHERE) <= commands, set(RUN_ELSEWHERE) - commands
    for source in [*PREREQUISITES, *PREREQUISITES.values()]:
        assert source in {b.source for b in BLOCKS}, source
    for old in BUDGET_COMMANDS:
        assert any(old in c for c in commands), old


def test_install_commands_are_checked_against_the_repository():
    check_install(["python", "-m", "pip", "install", "-e", ".[test,eval]"])
    check_install(["pip", "install", "./examples/vlbridge-resampler"])
    with pytest.raises(AssertionError, match="has no extra 'gpu'"):
        check_install(["pip", "install", ".[gpu]"])
    with pytest.raises(AssertionError, match="not a project of this repository"):
        check_install(["pip", "install", "./examples/no-such-plugin"])


@pytest.mark.parametrize("page, message", [
    ("<!-- docs-test: skip -->\n```bash\nvlbridge demo\n```\n", "with its reason"),
    ("<!-- docs-test: skip (needs the hub) -->\n\n```bash\nvlbridge demo\n```\n", "directly above"),
    ("<!-- docs-test: skip (prose) -->\n```\nplain text\n```\n", "never run"),
    ("```bash\nvlbridge demo\n", "never closed"),
], ids=["no-reason", "not-above", "above-prose", "unclosed"])
def test_markers_that_cannot_be_honoured_are_errors(tmp_path: Path, page: str, message: str):
    (tmp_path / "page.md").write_text(page, encoding="utf-8")
    with pytest.raises(DocsMarkupError, match=message):
        markdown_blocks(tmp_path / "page.md", tmp_path)


def test_a_marked_block_carries_its_reason(tmp_path: Path):
    (tmp_path / "page.md").write_text("text\n<!-- docs-test: skip (needs the hub) -->\n```yaml\na: 1\n```\n", encoding="utf-8")
    assert [(b.source, b.lang, b.skip) for b in markdown_blocks(tmp_path / "page.md", tmp_path)] == [
        ("page.md:3", "yaml", "needs the hub")]


def test_commands_are_parsed_by_vlbridges_own_parser_and_run_plain():
    """A flag that vlbridge no longer takes fails even in a command that runs elsewhere."""
    assert commands_of('vlbridge ask -q "what is this?" a.png && vlbridge plugins   # two\n') == [
        ["vlbridge", "ask", "-q", "what is this?", "a.png"], ["vlbridge", "plugins"]]
    check_arguments(["torchrun", "--nproc_per_node", "2", "-m", "vlbridge", "train", "config.yaml"])
    with pytest.raises(pytest.fail.Exception, match="parser refuses it"):
        check_arguments(["vlbridge", "demo", "--no-such-flag"])
    with pytest.raises(AssertionError, match="plain commands"):
        commands_of("vlbridge presets | head")
