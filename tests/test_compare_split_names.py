"""A comparison keeps each evaluation split's scores under the split's name (results.json, the
report, the stored retrieval scores). Two splits of one name would silently keep only the second
one's scores, and a name with '/' would put the stored scores in a folder of their own: both are
refused when the config is read, before anything trains."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from vlbridge.compare import CompareConfig

BASE = {"runs": [{"name": "mlp", "assembly": "tiny-mlp-opt", "stage2_steps": 1}], "output_dir": "out",
        "stage2_data": {"format": "jsonl", "paths": ["train.jsonl"]}}


def test_two_splits_of_one_name_are_refused():
    evals = [{"name": "test", "captions": "val.json", "tasks": ["caption"]}, {"name": "test", "captions": "test.json"}]
    with pytest.raises(ValidationError, match=r"evals: each split needs a name of its own .* got \['test', 'test'\]"):
        CompareConfig.model_validate({**BASE, "evals": evals})


@pytest.mark.parametrize("name", ["a/b", "../../escaped", ".hidden", "a\\b", "x" * 101])
def test_a_split_name_is_one_plain_file_name(name):
    with pytest.raises(ValidationError, match="names files of this split's stored scores, so it may not contain"):
        CompareConfig.model_validate({**BASE, "evals": [{"name": name, "captions": "c.json"}]})


def test_distinct_plain_split_names_are_kept():
    evals = [{"name": "val", "captions": "val.json"}, {"name": "test 2", "captions": "test.json"}]
    assert [e.name for e in CompareConfig.model_validate({**BASE, "evals": evals}).evals] == ["val", "test 2"]
