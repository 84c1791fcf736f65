"""The plugin loader and registry, with in-process fake plugins: isolation of every kind of
breakage, strict mode, duplicates and the 'distribution:name' qualifier."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest

import vlbridge
from vlbridge import ConnectorSpec, EncoderSpec, PluginError, TokenShape, UnknownComponentError
from vlbridge.plugin.loader import load_plugin_set
from vlbridge.plugin.registry import Registry, get_registry
from vlbridge.plugin.specs import Preprocess
from vlbridge.plugintest.check import check_plugin, registry_with


def module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(mod, key, value)
    return mod


def encoder_spec(name: str, width: int = 32) -> EncoderSpec:
    return EncoderSpec(
        name=name, factory="fake.module:build", output=lambda o: TokenShape(5, width),
        preprocess=lambda o: Preprocess(28, (0.5,) * 3, (0.5,) * 3),
    )


def hook_returning(value):
    @vlbridge.hookimpl
    def vlbridge_register_encoders():
        return value() if callable(value) else value

    return vlbridge_register_encoders


def test_builtins_register_through_the_hooks(monkeypatch):
    monkeypatch.setenv("VLBRIDGE_LOAD_PLUGINS", "")  # built-ins only: a plugin installed beside vlbridge adds its names
    registry = Registry.collect()
    assert registry.names("encoder") == ["clip-vit-l", "eva-vit-g", "hf-vision", "open-clip"]
    assert registry.names("llm") == ["flan-t5", "hf-causal-lm", "hf-seq2seq", "opt"]
    assert registry.names("connector") == ["linear", "mlp", "qformer"]
    records = registry.plugins.records
    assert all(r.builtin and r.status == "loaded" for r in records.values())
    assert records["vlbridge.plugins.connectors.projectors"].components == ["connector:linear", "connector:mlp"]


def test_good_third_party_plugin_is_listed_and_resolvable():
    registry = registry_with({"vlbridge-good": module("good", vlbridge_register_encoders=hook_returning([encoder_spec("good-enc")]))})
    spec = registry.resolve("encoder", "good-enc").spec
    assert (spec.plugin, spec.distribution) == ("vlbridge-good", "vlbridge-good")
    assert registry.plugins.records["vlbridge-good"].hooks == ["vlbridge_register_encoders"]


def _raise():
    raise RuntimeError("boom in hook")


@pytest.mark.parametrize(
    "plugin, expected",
    [
        (module("typo", vlbridge_register_encoder=hook_returning([])), "unknown hook(s) ['vlbridge_register_encoder']"),
        (module("raises", vlbridge_register_encoders=hook_returning(_raise)), "raised RuntimeError: boom in hook"),
        (module("wrongtype", vlbridge_register_encoders=hook_returning({"a": 1})), "must return a list of EncoderSpec, got dict"),
        (module("wrongitem", vlbridge_register_encoders=hook_returning(["eva"])), "returned a str; expected EncoderSpec"),
        (module("badfactory", vlbridge_register_encoders=hook_returning([encoder_spec("x").__class__(
            name="x", factory="no colon", output=lambda o: TokenShape(1, 1), preprocess=lambda o: None)])),
         "must be a 'package.module:attr' string"),
        (module("badstages", vlbridge_register_connectors=hook_returning([ConnectorSpec(
            name="y", factory="a.b:c", output=lambda o, e, w: TokenShape(1, w), stages=(3,))])),
         "y: stages (3,) must list the training stages it supports"),  # validated, built, and failed only in training
        (module("twice", vlbridge_register_encoders=hook_returning([encoder_spec("z"), encoder_spec("z")])),
         "declares encoder 'z' twice; a name must be unique within its kind"),  # was a duplicate that 'dist:z' could not resolve
    ],
    ids=["unknown-hook", "hook-raises", "wrong-return-type", "wrong-item-type", "bad-factory", "bad-stages", "same-name-twice"],
)
def test_broken_plugin_is_recorded_and_others_keep_working(plugin, expected):
    good = module("good", vlbridge_register_encoders=hook_returning([encoder_spec("good-enc")]))
    registry = registry_with({"vlbridge-broken": plugin, "vlbridge-good": good})
    record = registry.plugins.records["vlbridge-broken"]
    assert record.status == "error"
    assert any(expected in e for e in record.errors), record.errors
    assert "good-enc" in registry.names("encoder")
    assert "eva-vit-g" in registry.names("encoder")


def test_strict_mode_makes_breakage_fatal(monkeypatch):
    monkeypatch.setenv("VLBRIDGE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="boom in hook"):
        registry_with({"vlbridge-raises": module("raises", vlbridge_register_encoders=hook_returning(_raise))})


def test_import_error_of_entry_point_is_recorded(monkeypatch):
    class FakeDist:
        name, version = "vlbridge-missing", "1.0"

    class FakeEntryPoint:
        name, dist, module = "vlbridge-missing", FakeDist(), "vlbridge_missing.plugin"

        def load(self):
            raise ModuleNotFoundError("No module named 'some_dependency'")

    monkeypatch.delenv("VLBRIDGE_LOAD_PLUGINS")
    monkeypatch.setattr("vlbridge.plugin.loader.metadata.entry_points", lambda group: [FakeEntryPoint()])
    plugins = load_plugin_set()
    record = plugins.records["vlbridge-missing"]
    assert record.status == "error" and "No module named 'some_dependency'" in record.errors[0]
    assert Registry.collect(plugins).names("encoder") == ["clip-vit-l", "eva-vit-g", "hf-vision", "open-clip"]


def test_two_distributions_with_one_entry_point_name_both_load(monkeypatch):
    """A plugin copied from another (or the example) keeps its entry-point name: the second
    distribution to use it was skipped without a word, as if it were the first seen twice."""
    class FakeEntryPoint:
        def __init__(self, dist: str, connector: str):
            self.name, self.dist, self.connector = "vlbridge-pool", types.SimpleNamespace(name=dist, version="1"), connector
            self.module = f"{dist}.plugin"

        def load(self):
            return _connector_plugin(self.connector, len(self.dist.name))

    points = [FakeEntryPoint("vlbridge-pool", "pool"), FakeEntryPoint("a-pool-fork", "pool")]  # the fork sorts first
    monkeypatch.delenv("VLBRIDGE_LOAD_PLUGINS")
    monkeypatch.setattr("vlbridge.plugin.loader.metadata.entry_points", lambda group: points)
    registry = Registry.collect(load_plugin_set())
    assert sorted(str(s.distribution) for s in registry.components["connector"]["pool"]) == ["a-pool-fork", "vlbridge-pool"]
    # 'vlbridge-pool' is the fork's plugin (entry-point) name too: the distribution of that name wins
    assert registry.resolve("connector", "vlbridge-pool:pool").spec.distribution == "vlbridge-pool"
    assert registry.resolve("connector", "a-pool-fork:pool").spec.distribution == "a-pool-fork"


def test_allow_and_block_lists_skip_before_import(monkeypatch):
    loaded = []

    class FakeEntryPoint:
        def __init__(self, name):
            self.name, self.dist, self.module = name, types.SimpleNamespace(name=name, version="1"), name

        def load(self):
            loaded.append(self.name)
            return module(self.name)

    eps = [FakeEntryPoint("vlbridge-a"), FakeEntryPoint("vlbridge-b"), FakeEntryPoint("vlbridge-c")]
    monkeypatch.setattr("vlbridge.plugin.loader.metadata.entry_points", lambda group: eps)
    monkeypatch.setenv("VLBRIDGE_LOAD_PLUGINS", "vlbridge-a, vlbridge_b")
    monkeypatch.setenv("VLBRIDGE_DISABLE_PLUGINS", "vlbridge-b")
    records = load_plugin_set().records
    assert loaded == ["vlbridge-a"]
    assert records["vlbridge-b"].status == records["vlbridge-c"].status == "disabled"
    monkeypatch.setenv("VLBRIDGE_LOAD_PLUGINS", "")
    loaded.clear()
    assert [r.name for r in load_plugin_set().records.values() if not r.builtin] == ["vlbridge-a", "vlbridge-b", "vlbridge-c"]
    assert loaded == []


@pytest.mark.parametrize("name, value, message", [
    ("VLBRIDGE_STRICT_PLUGINS", "banana", "VLBRIDGE_STRICT_PLUGINS='banana' is neither on nor off"),
    ("VLBRIDGE_LOAD_PLUGINS", "vlbridge-a, nope", "VLBRIDGE_LOAD_PLUGINS names nope, which no installed plugin distribution is"),
])
def test_plugin_environment_values_that_mean_nothing_are_refused(monkeypatch, name, value, message):
    point = types.SimpleNamespace(name="vlbridge-a", dist=types.SimpleNamespace(name="vlbridge-a", version="1"),
                                  load=lambda: module("vlbridge-a"))
    monkeypatch.setattr("vlbridge.plugin.loader.metadata.entry_points", lambda group: [point])
    monkeypatch.delenv("VLBRIDGE_LOAD_PLUGINS")
    monkeypatch.setenv(name, value)
    with pytest.raises(PluginError, match=re.escape(message)):
        load_plugin_set()


def test_a_block_list_naming_an_absent_plugin_blocks_nothing_else(monkeypatch):
    monkeypatch.setenv("VLBRIDGE_DISABLE_PLUGINS", "vlbridge-not-here")  # "just in case" settings stay harmless
    assert "eva-vit-g" in Registry.collect(load_plugin_set()).names("encoder")


def _connector(name: str, tokens: int) -> ConnectorSpec:
    return ConnectorSpec(name=name, factory="fake.module:build", output=lambda o, e, w: TokenShape(tokens, w))


def _connector_plugin(name: str, tokens: int) -> types.ModuleType:
    @vlbridge.hookimpl
    def vlbridge_register_connectors():
        return [_connector(name, tokens)]

    return module(f"mod-{tokens}", vlbridge_register_connectors=vlbridge_register_connectors)


def test_duplicate_names_are_reported_and_qualifier_picks_one():
    registry = registry_with({"vlbridge-x": _connector_plugin("pool", 4), "vlbridge-y": _connector_plugin("pool", 9)})
    assert registry.duplicates() == [{"kind": "connector", "name": "pool", "providers": ["vlbridge-x", "vlbridge-y"]}]
    with pytest.raises(UnknownComponentError, match="several plugins .*'vlbridge-x:pool' or 'vlbridge-y:pool'"):
        registry.resolve("connector", "pool")
    assert registry.resolve("connector", "vlbridge-y:pool").spec.distribution == "vlbridge-y"
    with pytest.raises(UnknownComponentError, match="no connector named 'pool' comes from 'vlbridge-z'"):
        registry.resolve("connector", "vlbridge-z:pool")


def test_third_party_duplicate_of_a_builtin_keeps_the_builtin_with_a_warning():
    registry = registry_with({"vlbridge-x": _connector_plugin("linear", 4)})
    resolution = registry.resolve("connector", "linear")
    assert resolution.spec.distribution == "vlbridge"
    assert "vlbridge-x:linear" in resolution.warning
    assert registry.resolve("connector", "vlbridge-x:linear").spec.distribution == "vlbridge-x"


def test_unknown_name_suggests_and_lists():
    with pytest.raises(UnknownComponentError) as err:
        get_registry().resolve("encoder", "eva-vit-gg")
    assert "Did you mean 'eva-vit-g'?" in str(err.value)
    assert "Installed encoders: clip-vit-l, eva-vit-g" in str(err.value)


def test_an_unknown_name_points_at_plugins_that_failed_to_load():
    """The part asked for may be unknown only because its plugin broke (a spec that fails its check
    drops the whole plugin); the error said just 'unknown connector' and listed the others."""
    broken = _connector_plugin("Pool", 4)  # an upper-case name fails the spec's check
    registry = registry_with({"vlbridge-broken": broken, "vlbridge-good": _connector_plugin("pool", 9)})
    with pytest.raises(UnknownComponentError) as err:
        registry.resolve("connector", "resampler")
    assert "Plugins that failed to load, one of which may declare it: vlbridge-broken (vlbridge plugins shows why)" in str(err.value)
    with pytest.raises(UnknownComponentError) as err:
        registry_with({"vlbridge-good": _connector_plugin("pool", 9)}).resolve("connector", "resampler")
    assert "failed to load" not in str(err.value)


def test_check_plugin_accepts_builtins_and_rejects_mistakes():
    assert [s.name for s in check_plugin("vlbridge.plugins.connectors.projectors")] == ["linear", "mlp"]
    with pytest.raises(PluginError, match="unknown hook"):
        check_plugin(module("typo", vlbridge_register_encoder=hook_returning([])))
    with pytest.raises(PluginError, match="implements no vlbridge hook"):
        check_plugin(module("empty"))
    with pytest.raises(PluginError, match="declares encoder 'z' twice"):
        check_plugin(module("twice", vlbridge_register_encoders=hook_returning([encoder_spec("z"), encoder_spec("z")])), build=False)
    with pytest.raises(PluginError, match="output\\(\\) must return a positive TokenShape"):
        check_plugin(module("zero", vlbridge_register_encoders=hook_returning([encoder_spec("z", width=0)])))


def test_hookspecs_are_documented(repo):
    """Every hook appears, by name, in the plugin author's guide (datasette's meta-test)."""
    from vlbridge.plugin.hookspecs import HOOK_KINDS

    guide = (repo / "docs" / "writing-plugins.md").read_text()
    for hook in HOOK_KINDS:
        assert f"{hook}()" in guide, f"{hook} is not documented in docs/writing-plugins.md"


REGISTRATION = '''{heavy}
import vlbridge


@vlbridge.hookimpl
def vlbridge_register_connectors():
    return []
'''


def test_the_listing_names_a_plugin_whose_registration_module_imports_torch(tmp_path, monkeypatch, capsys):
    """Only check_plugin said so; `vlbridge plugins` listed such a plugin as loaded, without a word.
    Each module is probed alone (this process imported both), with check_plugin's own probe."""
    import functools
    import importlib
    import json

    from vlbridge.cli.main import main
    from vlbridge.plugin.hookspecs import PROJECT
    from vlbridge.plugintest.heavy_imports import heavy_imports

    class FakeEntryPoint:
        def __init__(self, name: str, module: str):
            self.name, self.module, self.dist = name, module, types.SimpleNamespace(name=name, version="1")

        def load(self):
            return importlib.import_module(self.module)

    for kind, heavy in (("heavy", "import torch"), ("light", "")):
        (tmp_path / f"{kind}_registration.py").write_text(REGISTRATION.format(heavy=heavy), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("VLBRIDGE_LOAD_PLUGINS")
    points = [FakeEntryPoint("vlbridge-heavy", "heavy_registration"), FakeEntryPoint("vlbridge-light", "light_registration")]
    # vlbridge's group only: torch, first imported here when this test runs alone, reads its backends' group at import
    monkeypatch.setattr("vlbridge.plugin.loader.metadata.entry_points", lambda group: points if group == PROJECT else [])
    # the real probe, once per module for both listings: each probe is a fresh interpreter (one imports torch)
    monkeypatch.setattr("vlbridge.cli.listing.heavy_imports", functools.cache(heavy_imports))
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert ("\nvlbridge-heavy: heavy_registration: importing it imports torch; vlbridge imports a registration module to "
            "list components and validate assemblies, which stay torch-free") in out
    assert "vlbridge-light:" not in out
    assert main(["plugins", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)["plugins"]}
    assert listed["vlbridge-heavy"]["heavy_imports"] == ["torch"] and listed["vlbridge-light"]["heavy_imports"] == []
    assert listed["vlbridge-heavy"]["status"] == "loaded" and listed["vlbridge-heavy"]["module"] == "heavy_registration"


def test_an_unknown_name_points_at_installed_plugins_the_variables_skipped(monkeypatch):
    """An assembly naming a part of a plugin that VLBRIDGE_LOAD_PLUGINS left out was told only
    'unknown llm', as if the plugin were not installed; the qualified form already said why."""
    point = types.SimpleNamespace(name="vlbridge-tinygpt", module="vlbridge_tinygpt.plugin",
                                  dist=types.SimpleNamespace(name="vlbridge-tinygpt", version="1"),
                                  load=lambda: _connector_plugin("tinygpt", 4))
    monkeypatch.setattr("vlbridge.plugin.loader.metadata.entry_points", lambda group: [point])
    monkeypatch.setenv("VLBRIDGE_LOAD_PLUGINS", "")
    with pytest.raises(UnknownComponentError) as err:
        Registry.collect(load_plugin_set()).resolve("connector", "tinygpt")
    assert ("Plugins installed but not loaded (VLBRIDGE_LOAD_PLUGINS or VLBRIDGE_DISABLE_PLUGINS leaves them out), "
            "one of which may declare it: vlbridge-tinygpt (vlbridge plugins --all lists them).") in str(err.value)
    monkeypatch.setenv("VLBRIDGE_LOAD_PLUGINS", "vlbridge-tinygpt")
    with pytest.raises(UnknownComponentError) as err:
        Registry.collect(load_plugin_set()).resolve("connector", "resampler")
    assert "not loaded" not in str(err.value)


def test_building_an_assembly_says_its_plan_warnings(recwarn):
    """A plain `use: linear` next to a plugin's own `linear` keeps the built-in "with a warning", but
    only `vlbridge validate` printed it: `vlbridge train`, caption and `vlbridge.build` were silent."""
    from vlbridge import AssemblyWarning
    from vlbridge.plugintest.check import using_registry

    config = {"name": "shadowed", "encoder": {"use": "eva-vit-g", "options": {"variant": "tiny"}},
              "connector": {"use": "linear"}, "llm": {"use": "opt", "options": {"variant": "tiny"}}}
    with using_registry(registry_with({"vlbridge-x": _connector_plugin("linear", 4)})):
        with pytest.warns(AssemblyWarning, match=r"assembly shadowed: connector 'linear' is provided by vlbridge, vlbridge-x; "
                                                 r"using the built-in one \(write 'vlbridge:linear' or 'vlbridge-x:linear' to choose\)"):
            model = vlbridge.build(config)
    assert model.plan.connector.distribution == "vlbridge"
    recwarn.clear()
    vlbridge.build(config)  # without the shadowing plugin: nothing to say
    assert not [w for w in recwarn if issubclass(w.category, AssemblyWarning)]


def test_the_cli_says_a_plan_warning_as_a_plain_line(capsys):
    """Python's format named the frame that raised it (a contextlib line of the build's decorator)."""
    from vlbridge.cli.main import main
    from vlbridge.plugintest.check import using_registry

    image = str(Path(__file__).resolve().parents[1] / "examples" / "images" / "red-circle.png")
    with using_registry(registry_with({"vlbridge-x": _connector_plugin("linear", 4)})):
        assert main(["caption", "--assembly", "tiny-linear-opt", "--num-beams", "1", "--max-new-tokens", "2", image]) == 0
    err = capsys.readouterr().err
    assert ("vlbridge caption: warning: assembly tiny-linear-opt: connector 'linear' is provided by vlbridge, vlbridge-x; "
            "using the built-in one (write 'vlbridge:linear' or 'vlbridge-x:linear' to choose)\n") in err
    assert "contextlib" not in err


def test_an_options_field_without_a_default_is_named_with_the_fix():
    """The refusal was pydantic's own dump ("Field required [type=missing, input_value={}, ...]", a URL)
    inside 'options model must build with no arguments': it did not say that every field needs a default."""
    from pydantic import Field

    class NoDefaults(vlbridge.Options):
        width: int = Field(description="token width")
        depth: int = Field(2, description="blocks")

    spec = EncoderSpec(name="z", factory="fake.module:build", options=NoDefaults, output=lambda o: TokenShape(4, 8),
                       preprocess=lambda o: Preprocess(28, (0.5,) * 3, (0.5,) * 3))
    with pytest.raises(PluginError, match=re.escape(
            "z: every field of NoDefaults needs a default (an assembly may set none of its options), and width has none: "
            "give it one, e.g. Field(DEFAULT, description=...)")):
        check_plugin(module("nodefault", vlbridge_register_encoders=hook_returning([spec])), build=False)
