"""The `lmms_eval.models` entry point: lmms-eval loads it when it lists its models, so that
`--model vlbridge` resolves to `vlbridge.lmms.model.VLBridgeLMM` with no edit to lmms-eval.
Cheap on purpose: the class (and torch) is imported only when a run asks for it."""

from __future__ import annotations

from typing import Any

MODEL_ID = "vlbridge"
CLASS_PATH = "vlbridge.lmms.model.VLBridgeLMM"


def models() -> list[Any]:
    """The manifests lmms-eval registers (its ModelRegistryV2 payload)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)]
