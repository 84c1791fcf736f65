"""Stored retrieval scores are keyed by the scoring rule too: scores a stage 1 stored before ITM's
ties outside the shortlist were broken by ITC were found by the same name and reused, so a rerun
reported them beside newly scored runs, two rules in one table."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vlbridge.compare import runner
from vlbridge.compare.config import EvalSet


def test_a_new_scoring_rule_names_a_new_store(tmp_path: Path, monkeypatch):
    captions = tmp_path / "captions.json"
    captions.write_text("[]", encoding="utf-8")
    spec = EvalSet(name="test", captions=str(captions), tasks=["retrieval"])
    monkeypatch.setattr(runner, "evaluation_images", lambda spec: "digest")
    current = runner.retrieval_store(tmp_path, spec)
    assert current == runner.retrieval_store(tmp_path, spec) and current.name.startswith("retrieval-test-")
    # the name rule-1 scores were stored under (the key before the rule was part of it) is not the current one
    old_key = json.dumps([spec.model_dump(mode="json"), runner.data_fingerprint([spec.captions, spec.scenes]), "digest"], sort_keys=True)
    assert current.name != f"retrieval-test-{hashlib.sha256(old_key.encode()).hexdigest()[:12]}.json"
    monkeypatch.setattr(runner, "RETRIEVAL_SCORING", runner.RETRIEVAL_SCORING - 1)
    assert runner.retrieval_store(tmp_path, spec) != current  # an earlier rule's scores are not found
