"""A compare's VQA answers had 5 new tokens at most whatever its config said: `generation`'s
max_new_tokens was overridden without a word. `vqa_max_new_tokens` sets it (default 5, short answers)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vlbridge.compare import CompareConfig
from vlbridge.compare import evaluation


def _config(**extra) -> CompareConfig:
    return CompareConfig.model_validate({
        "runs": [{"name": "proj", "assembly": "tiny-mlp-opt", "stage2_steps": 2}], "output_dir": "out",
        "stage2_data": {"format": "jsonl", "paths": ["train.jsonl"]},
        "evals": [{"name": "test", "questions": "q.json", "annotations": "a.json", "tasks": ["vqa"]}], **extra})


@pytest.mark.parametrize(("extra", "tokens"), [({}, 5), ({"vqa_max_new_tokens": 9}, 9)])
def test_the_vqa_answer_length_is_the_configs(monkeypatch, extra, tokens):
    from vlbridge.evaluation import readable

    seen = {}
    record = SimpleNamespace(image="x.png", question="what colour?", question_id=1)
    monkeypatch.setattr(evaluation, "vqa_records", lambda spec: [record])
    monkeypatch.setattr(readable, "check_images", lambda refs: None)
    monkeypatch.setattr(evaluation, "question_categories", lambda annotations: {})
    monkeypatch.setattr(evaluation, "vqa_scores", lambda predictions, records, categories: {"accuracy": 0.0})

    def generate(model, encoded, refs, prompts, options, **kwargs):
        seen["options"] = options
        return ["red"]

    monkeypatch.setattr(evaluation, "_generate", generate)
    config = _config(**extra)
    model = SimpleNamespace(llm=SimpleNamespace(is_encoder_decoder=False))
    evaluation.evaluate_set(config, model, config.evals[0], say=lambda message: None)
    assert seen["options"].max_new_tokens == tokens and seen["options"].num_beams == 1  # the rest of `generation` still applies
