"""Old module paths that plugin authors could import keep working for one release, with a warning."""
# house-rewrite: off  (this file names the old paths on purpose)

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

from tests.test_architecture import SHIMS

REPO = Path(__file__).resolve().parents[1]
MOVED = {"vlbridge.specs": "vlbridge.plugin.specs", "vlbridge.hookspecs": "vlbridge.plugin.hookspecs",
         "vlbridge.testing": "vlbridge.plugintest.check", "vlbridge.freeze": "vlbridge.parts.freeze",
         "vlbridge.attention": "vlbridge.parts.attention", "vlbridge.images": "vlbridge.parts.images",
         "vlbridge.connector_protocol": "vlbridge.modeling.connector_protocol",
         "vlbridge.contract": "vlbridge.plugin.contract", "vlbridge.lora": "vlbridge.finetune.lora",
         "vlbridge.retrieval": "vlbridge.modeling.retrieval"}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_warns_and_is_the_new_module(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=re.escape(f"{old} moved to {MOVED[old]}")):
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])


def test_an_old_from_import_still_gives_the_names():
    sys.modules.pop("vlbridge.testing", None)
    with pytest.warns(DeprecationWarning):
        from vlbridge.testing import check_plugin, registry_with, using_registry
    from vlbridge.plugintest import check

    assert (check_plugin, registry_with, using_registry) == (check.check_plugin, check.registry_with, check.using_registry)


def test_the_shims_are_the_ones_the_architecture_test_forbids_inside_and_the_docs_list():
    assert set(MOVED) == SHIMS
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    listed = dict(re.findall(r"^\| `(vlbridge\.\w+)` \| `(vlbridge\.[\w.]+)` \|", text, re.MULTILINE))
    assert listed == MOVED
