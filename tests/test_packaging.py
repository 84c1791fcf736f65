"""pyproject.toml lists every package under core/ and plugins/, so `pip install .` ships them all
(the editable install would hide a missing one)."""

from __future__ import annotations

import tomllib

from tests.conftest import REPO


def _packages_on_disk() -> set[str]:
    found = set()
    for root, prefix in ((REPO / "core", "vlbridge"), (REPO / "plugins", "vlbridge.plugins")):
        for init in root.rglob("__init__.py"):
            parts = init.parent.relative_to(root).parts
            found.add(".".join((prefix, *parts)))
    return found


def test_every_package_is_listed():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    missing = sorted(_packages_on_disk() - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
