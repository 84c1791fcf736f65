"""`vlbridge eval --out` that a file stands in the way of (the path itself, or a folder above it) is
refused before the model runs: it was found only when the results were written, after the whole
evaluation (hours with a real model) had run for nothing."""

from __future__ import annotations

import pytest

from vlbridge.cli.main import main
from vlbridge.evaluation import tasks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("below", ["", "sub"])
def test_an_out_path_blocked_by_a_file_is_refused_before_evaluating(tmp_path, capsys, monkeypatch, below):
    def never(*args, **kwargs):
        raise AssertionError("the data was read and the model run before --out was checked")

    monkeypatch.setattr(tasks, "load_caption_groups", never)
    blocking = tmp_path / "taken"
    blocking.write_text("not a folder", encoding="utf-8")
    out = blocking / below if below else blocking
    code = main(["eval", "-a", "tiny-qformer-opt", "--task", "caption", "--data", str(tmp_path / "captions.json"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"--out {str(out)!r}: {str(blocking)!r} is a file; give a folder (new or existing)" in err
