"""Assemblies: YAML (or a preset, or a dict) -> a validated `Assembly` and its `Plan`. Never imports torch."""
