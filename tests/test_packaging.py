"""pyproject.toml ships everything `pip install .` needs: every package under core/ and plugins/ is
listed, and the wheel holds every file of theirs (the data the package reads at run time: registry.yaml,
the world's parts and manifest, the tiny tokenizers, hub_configs.json). An editable install reads the
source tree, so it would hide a file that the wheel leaves out."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGE_DIRS = PYPROJECT["tool"]["setuptools"]["package-dir"]  # import name -> source folder
ROOTS = {folder: name for name, folder in PACKAGE_DIRS.items() if "/" not in folder}  # core -> vlbridge, plugins -> vlbridge.plugins


def _packages_on_disk() -> set[str]:
    found = set()
    for folder, prefix in ROOTS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((prefix, *parts)))
    return found


def _shipped_files() -> dict[str, Path]:
    """Every file under the package folders (minus bytecode caches), by where it lands in the wheel."""
    shipped = {}
    for folder, prefix in ROOTS.items():
        for path in sorted((REPO / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                shipped["/".join((*prefix.split("."), *path.relative_to(REPO / folder).parts))] = path
    return shipped


def _unmet_build_requirement() -> str | None:
    for text in PYPROJECT["build-system"]["requires"]:
        requirement = Requirement(text)
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            return f"{text} is not installed"
        if not requirement.specifier.contains(version, prereleases=True):
            return f"{text} is needed, {version} is installed"
    return None


def test_every_package_is_listed():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    missing = sorted(_packages_on_disk() - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"


def test_the_wheel_holds_every_file_the_package_reads(tmp_path):
    unmet = _unmet_build_requirement()
    if unmet:
        pytest.skip(f"cannot build the wheel offline: the build backend's requirement {unmet}")
    source = tmp_path / "src"  # a copy: a build in the checkout leaves build/ behind, whose stale files a later wheel takes
    for folder in ROOTS:
        shutil.copytree(REPO / folder, source / folder, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for path in REPO.iterdir():  # pyproject.toml, README.md (the long description), registry.yaml (a link's target)
        if path.is_file():
            shutil.copy2(path, source / path.name)
    built = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; build_meta.build_wheel(sys.argv[1])",
                            str(tmp_path / "dist")], cwd=source, capture_output=True, text=True)
    assert built.returncode == 0, f"building the wheel failed:\n{built.stderr[-3000:]}"
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        held = set(archive.namelist())
        shipped = _shipped_files()
        missing = sorted(name for name in shipped if name not in held)
        assert not missing, f"the wheel lacks {missing}: add them to [tool.setuptools.package-data] in pyproject.toml"
        differ = sorted(name for name, path in shipped.items() if archive.read(name) != path.read_bytes())
    assert not differ, f"the wheel's copies of {differ} differ from the source tree's (a link not followed?)"
