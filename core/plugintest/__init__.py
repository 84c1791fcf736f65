"""Helpers for plugin authors' own tests: `check_plugin` (declarations, then a real build probed on a
dummy input) and registries with extra plugins."""
