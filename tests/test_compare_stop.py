"""A comparison stopped while its workers train leaves no process behind.

Ctrl-C reaches every process of the terminal's group, the workers' data-loader processes too, and
`vlbridge compare` then killed its workers outright (SIGTERM, Python's default: no unwinding). Their
loader processes, already out of their loop, stayed for good: blocked on a full pipe that nobody would
read again, holding shared memory, one `ps` line each (found by running examples/compare-world.yaml
and pressing Ctrl-C in stage 2). A SIGTERM to the command itself (a scheduler's stop) left the
workers training on, unseen. Linux only: the processes are found in /proc.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests import fake_plugins as fake

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes in /proc (Linux)")

LOADERS = 2  # data-loader processes per worker


def group_members(group: int) -> dict[int, int]:
    """The live processes of a process group, each with its parent (fields 4 and 5 of /proc/PID/stat)."""
    members = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, parent, pgrp = stat[stat.rindex(")") + 2:].split()[:3]  # after "pid (comm) "
        if int(pgrp) == group and state != "Z":
            members[int(entry.name)] = int(parent)
    return members


def loaders(group: int) -> dict[int, int]:
    """The data-loader processes of a comparison's process group, each with its worker: the
    children of the command's children (the command itself, the group's leader, is a test's child)."""
    members = group_members(group)
    return {pid: parent for pid, parent in members.items() if pid != group and parent in members and parent != group}


def _comparison(tmp_path: Path) -> Path:
    from vlbridge.world import WorldConfig, generate_world

    world = tmp_path / "world"
    generate_world(world, WorldConfig(train=256, val=0, test=4, comp=0, questions_per_image=1))
    captions = world / "captions_train.json"
    pairs = json.loads(captions.read_text(encoding="utf-8"))
    for pair in pairs:  # batches of ~100 KB (a pair carries its image's captions): a loader's pipe is full while it waits
        pair["caption"] = pair["caption"] * 4
    captions.write_text(json.dumps(pairs), encoding="utf-8")
    data = {"format": "coco", "paths": [str(world / "captions_train.json")], "image_root": str(world), "num_workers": LOADERS}
    # tiny-linear-opt and tiny-mlp-opt with EVA's tiny tower (fake.assembly): no open_clip to import in each process
    runs = [{"name": name, "assembly": fake.assembly(name), "stage2_steps": 100_000} for name in ("linear", "mlp")]
    config = {"name": "stopped", "runs": runs,
              "stage2_data": data, "batch_size": 32, "features": True, "threads": 1, "jobs": 2, "device": "cpu",
              "evals": [{"name": "test", "captions": str(world / "captions_test.json"), "images": str(world), "tasks": ["caption"]}],
              "output_dir": str(tmp_path / "out")}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_a_stopped_comparison_leaves_no_process_behind(tmp_path: Path, stop: str):
    config = _comparison(tmp_path)
    log = tmp_path / "stderr.txt"  # a file, not a pipe: a process left behind would hold a pipe open
    with log.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "vlbridge", "compare", str(config)], cwd=tmp_path,
                                   start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr)
    group = process.pid
    try:
        deadline = time.monotonic() + 240
        while len(loaders(group)) < 2 * LOADERS:  # both workers' loader processes run: both workers are in stage 2
            assert process.poll() is None and time.monotonic() < deadline, log.read_text(encoding="utf-8")
            time.sleep(0.2)
        time.sleep(3)  # the loaders fill their queues (stopped sooner, a worker's resource_sharer thread can print a traceback)
        if stop == "ctrl-c":
            os.killpg(group, signal.SIGINT)  # what the terminal sends: every process of the group
        else:
            process.send_signal(signal.SIGTERM)  # a scheduler stops the command it started
        process.wait(timeout=120)
        deadline = time.monotonic() + 30
        while group_members(group) and time.monotonic() < deadline:
            time.sleep(0.2)
        left, err = sorted(group_members(group)), log.read_text(encoding="utf-8")
        assert not left, f"{len(left)} processes left running after the comparison ended: {left}\n{err}"
        assert process.returncode == 128 + (signal.SIGINT if stop == "ctrl-c" else signal.SIGTERM), err
        assert "Traceback" not in err, err
        assert "run the same command again to go on" in err and "resumes from its last checkpoint" in err, err
    finally:
        for pid in group_members(group):
            os.kill(pid, signal.SIGKILL)
