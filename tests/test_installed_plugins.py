"""End to end with real pip-installed distributions, in a throw-away virtual environment:
`pip install .` of vlbridge itself (not editable), the example plugin, and three broken fixtures
(an import error, a hook-name typo, a duplicate component name)."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "plugins"
PACKAGES = [REPO, REPO / "examples" / "vlbridge-resampler", *(FIXTURES / n for n in ("vlbridge-broken", "vlbridge-typo", "vlbridge-dup"))]


def outer_site_dirs() -> list[str]:
    """The site-packages of the interpreter running the tests: a venv's, a conda env's or the base
    interpreter's. (`venv --system-site-packages` run from inside a venv would expose the *base*
    interpreter's instead, which may lack torch and a new enough setuptools.)"""
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def make_venv(root: Path) -> Path:
    """An empty venv that also sees the outer interpreter's packages, after its own. The outer
    directories are plain path lines in a .pth file, so their own .pth hooks (an editable install
    of vlbridge among them) do not run and the copy installed here is the one imported."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    Path(own, "_vlbridge_outer_env.pth").write_text("".join(d + "\n" for d in outer_site_dirs()), encoding="utf-8")
    return python


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("venv")
    python = make_venv(root)
    build = tmp_path_factory.mktemp("build")
    # Install from copies so the source tree gets no build/ or egg-info litter (the copies leave out
    # .git, which no build reads). One pip run for all: pip starts once. --without-pip, --no-deps,
    # --no-build-isolation: pip, setuptools and the dependencies come from the outer environment, so
    # nothing is downloaded.
    copies = [shutil.copytree(package, build / package.name, ignore=shutil.ignore_patterns(".git")) for package in PACKAGES]
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                                "--disable-pip-version-check", *map(str, copies)], capture_output=True, text=True, check=False)
    assert installed.returncode == 0, f"pip install failed:\n{installed.stderr[-3000:]}"
    return root


def vlbridge(venv: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VLBRIDGE_")}
    environ.update(env)
    return subprocess.run([str(venv / "bin" / "vlbridge"), *args], capture_output=True, text=True, env=environ,
                          cwd=venv, check=False)


def test_installed_copy_is_used_and_finds_registry_yaml(venv):
    code = ("import vlbridge, vlbridge.plugin.resources as r; print(vlbridge.__file__); "
            "print(r.REGISTRY_FILE.is_file() and not r.REGISTRY_FILE.is_symlink())")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, cwd=venv, check=True).stdout
    path, regular_file = out.split()
    assert path.startswith(str(venv)) and regular_file == "True"
    result = vlbridge(venv, "validate", "blip2-flan-t5-xl")
    assert result.returncode == 0, result.stderr


def test_plugins_lists_the_example_and_shows_broken_ones(venv):
    result = vlbridge(venv, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    plugins = {p["name"]: p for p in data["plugins"]}
    assert plugins["vlbridge-resampler"]["status"] == "loaded"
    assert plugins["vlbridge-resampler"]["components"] == ["connector:resampler"]
    assert plugins["vlbridge-resampler"]["version"] == "0.1.0"
    assert plugins["vlbridge-resampler"]["module"] == "vlbridge_resampler.plugin"
    assert plugins["vlbridge-resampler"]["heavy_imports"] == plugins["vlbridge-broken"]["heavy_imports"] == []  # torch-free; unimportable
    assert plugins["vlbridge-broken"]["status"] == "error"
    assert "No module named 'vlbridge_dependency_that_is_not_installed'" in plugins["vlbridge-broken"]["errors"][0]
    assert "unknown hook(s) ['vlbridge_register_encoder']" in plugins["vlbridge-typo"]["errors"][0]
    assert plugins["vlbridge.plugins.encoders.eva_vit_g"]["status"] == "loaded"
    assert data["duplicates"] == [{"kind": "connector", "name": "resampler", "providers": ["vlbridge-dup", "vlbridge-resampler"]}]
    text = vlbridge(venv, "plugins").stdout
    assert "vlbridge-broken: ModuleNotFoundError" in text and "duplicate connector 'resampler'" in text


ASSEMBLY = "name: r\nencoder: {use: eva-vit-g}\nconnector: {use: %s, options: {num_latents: 48}}\nllm: {use: opt}\n"


def test_example_plugin_validates_in_an_assembly(venv, tmp_path):
    path = tmp_path / "resampler.yaml"
    path.write_text(ASSEMBLY % '"vlbridge-resampler:resampler"')
    result = vlbridge(venv, "validate", str(path), "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)["plan"]
    assert plan["connector"]["distribution"] == "vlbridge-resampler"
    assert plan["connector_out"] == {"num_tokens": 48, "width": 2560}

    path.write_text(ASSEMBLY % "resampler")
    ambiguous = vlbridge(venv, "validate", str(path))
    assert ambiguous.returncode == 2
    assert "provided by several plugins (vlbridge-dup, vlbridge-resampler)" in ambiguous.stderr
    assert vlbridge(venv, "validate", str(path), VLBRIDGE_DISABLE_PLUGINS="vlbridge-dup").returncode == 0


def test_allow_list_and_strict_mode(venv):
    only_builtins = json.loads(vlbridge(venv, "plugins", "--json", VLBRIDGE_LOAD_PLUGINS="").stdout)
    assert all(p["builtin"] for p in only_builtins["plugins"])
    listed_all = json.loads(vlbridge(venv, "plugins", "--json", "--all", VLBRIDGE_LOAD_PLUGINS="vlbridge-resampler").stdout)
    status = {p["name"]: p["status"] for p in listed_all["plugins"]}
    assert status["vlbridge-resampler"] == "loaded" and status["vlbridge-broken"] == "disabled"
    strict = vlbridge(venv, "plugins", VLBRIDGE_STRICT_PLUGINS="1")
    assert strict.returncode == 2
    assert "plugin 'vlbridge-broken'" in strict.stderr and "Traceback" not in strict.stderr


def test_example_plugins_own_tests_pass(venv):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VLBRIDGE_")}
    environ["VLBRIDGE_DISABLE_PLUGINS"] = "vlbridge-dup"
    tests = REPO / "examples" / "vlbridge-resampler" / "tests"
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "--rootdir", str(tests), str(tests)], capture_output=True, text=True, env=environ, check=False)
    assert result.returncode == 0, result.stdout[-3000:]


SAVE_AND_LOAD = """
import json, os, sys, yaml, vlbridge
from vlbridge.plugin.registry import get_registry, invalidate
out = sys.argv[1]
os.environ["VLBRIDGE_DISABLE_PLUGINS"] = "vlbridge-dup"  # saved while one plugin provides 'resampler'
model = vlbridge.build({"name": "r", "encoder": {"use": "eva-vit-g", "options": {"variant": "tiny"}},
                        "connector": {"use": "resampler", "options": {"num_latents": 4}},
                        "llm": {"use": "opt", "options": {"variant": "tiny"}}})
model.save(out)
saved = yaml.safe_load(open(out + "/assembly.yaml"))
del os.environ["VLBRIDGE_DISABLE_PLUGINS"]  # loaded where a second plugin claims the name too
invalidate()
print(json.dumps({"saved": saved, "loaded_from": vlbridge.load(out).plan.connector.distribution,
                  "duplicates": get_registry().duplicates()}))
"""


def test_a_checkpoint_names_its_plugin_distribution_and_requires_it(venv, tmp_path):
    """Saved while one plugin provides 'resampler', the checkpoint still loads once a second one
    claims the name (one interpreter, its registry rebuilt in between), and a machine where the plugin
    is not loaded is told which distribution it needs."""
    script = tmp_path / "save_load.py"
    script.write_text(SAVE_AND_LOAD, encoding="utf-8")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VLBRIDGE_")}
    done = subprocess.run([str(venv / "bin" / "python"), str(script), str(tmp_path / "ckpt")], capture_output=True, text=True,
                          cwd=venv, env=environ, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assembly = result["saved"]
    assert assembly["connector"]["use"] == "vlbridge-resampler:resampler" and assembly["requires"] == ["vlbridge-resampler"]
    assert result["loaded_from"] == "vlbridge-resampler"
    assert result["duplicates"] == [{"kind": "connector", "name": "resampler", "providers": ["vlbridge-dup", "vlbridge-resampler"]}]
    refused = vlbridge(venv, "validate", str(tmp_path / "ckpt" / "assembly.yaml"), VLBRIDGE_DISABLE_PLUGINS="vlbridge-resampler")
    assert refused.returncode == 2
    assert "the plugin distribution 'vlbridge-resampler' is installed but was not loaded" in refused.stderr


def test_trace_and_an_isolated_test_registry(venv):
    traced = vlbridge(venv, "components", "--kind", "connector", VLBRIDGE_TRACE_PLUGINS="1")
    assert traced.returncode == 0, traced.stderr
    assert "vlbridge_register_connectors of vlbridge-resampler (vlbridge-resampler) returned [resampler]" in traced.stderr
    code = "from vlbridge.plugintest.check import registry_with; print(sorted(registry_with({}).names('connector')))"
    names = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, cwd=venv, check=True).stdout
    assert "resampler" not in names and "qformer" in names  # built-ins only, whatever is installed
