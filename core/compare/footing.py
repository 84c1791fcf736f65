"""The report's note on equal footing: what every run's training shares, and every setting in which
runs differ (a per-run override of steps, lr, data, stage 1 or connector options), so a reader of
the table sees an unequal budget without opening the config (no torch, no I/O)."""

from __future__ import annotations

import json
from typing import Any

from vlbridge.compare.config import CompareConfig, RunSpec


def _settings(config: CompareConfig, run: RunSpec) -> dict[str, str]:
    """A trained run's settings that may differ between runs, as the report prints them."""
    stage1 = f"from {run.init_from}" if run.init_from else str(run.stage1_steps)
    data = config.stage2_data_of(run)
    return {"stage-1 steps": stage1, "stage-2 steps": str(run.stage2_steps), "peak lr": f"{run.lr or config.lr:g}",
            "stage-2 data": "the comparison's" if run.stage2_data is None else json.dumps(data, sort_keys=True),
            "connector options": json.dumps(run.connector_options, sort_keys=True) if run.connector_options else "the assembly's"}


def footing_notes(config: CompareConfig) -> list[str]:
    """One note on what the trained runs share, and one per setting in which they differ."""
    trained = [r for r in config.runs if r.checkpoint is None]
    if not trained:
        return []
    notes = [f"Training shared by every trained run: batch {config.batch_size}, AdamW, warm-up {config.warmup_steps} steps + cosine, "
             f"seeds {', '.join(map(str, config.seeds))}."]
    settings = {r.name: _settings(config, r) for r in trained}
    for key in settings[trained[0].name]:
        values: dict[str, Any] = {name: s[key] for name, s in settings.items()}
        if len(set(values.values())) > 1:
            notes.append(f"Runs differ in {key}: " + "; ".join(f"{name} {value}" for name, value in values.items()) + ".")
    if len(notes) == 1 and len(trained) > 1:
        notes[0] += " Stage-1 and stage-2 steps, peak lr, stage-2 data and connector options are the same for every run."
    untrained = [r.name for r in config.runs if r.checkpoint is not None]
    if untrained:
        notes.append(f"Evaluated as given, not trained here: {', '.join(untrained)}.")
    return notes
