"""docs/writing-plugins.md cannot rot: its smallest connector (plugin.py + model.py, copied out of
the page) passes check_plugin, builds, captions and trains; every interface attribute vlbridge
calls is documented there."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from PIL import Image

import vlbridge
from vlbridge.plugintest.check import check_plugin, registry_with
from vlbridge.train.objectives import Stage2Objective

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FILE_BLOCK = re.compile(r"```python\n# (vlbridge_pool/\w+\.py)\n(.*?)```", re.S)


@pytest.fixture
def guide_package(repo, tmp_path, monkeypatch):
    """The guide's files written out as the package vlbridge_pool, importable for this test."""
    blocks = dict(FILE_BLOCK.findall((repo / "docs" / "writing-plugins.md").read_text(encoding="utf-8")))
    assert sorted(blocks) == ["vlbridge_pool/model.py", "vlbridge_pool/plugin.py"]
    (tmp_path / "vlbridge_pool").mkdir()
    (tmp_path / "vlbridge_pool" / "__init__.py").write_text("", encoding="utf-8")
    for path, code in blocks.items():
        (tmp_path / path).write_text(code, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "vlbridge_pool.plugin"
    for name in [m for m in sys.modules if m.split(".")[0] == "vlbridge_pool"]:
        del sys.modules[name]


def test_the_smallest_connector_works(guide_package):
    import importlib

    plugin = importlib.import_module(guide_package)
    assert [s.name for s in check_plugin(plugin)] == ["pool"]
    assembly = vlbridge.load_assembly({"name": "guide", "encoder": {"use": "eva-vit-g", "options": {"variant": "tiny"}},
                                       "connector": {"use": "pool", "options": {"num_tokens": 4}},
                                       "llm": {"use": "opt", "options": {"variant": "tiny"}}},
                                      registry=registry_with({"vlbridge-pool": plugin}))
    model = vlbridge.build(assembly)
    assert not hasattr(model.connector, "set_stage")
    assert model.num_parameters(trainable=True) == assembly.plan.trainable_params[2]
    assert len(model.caption(Image.new("RGB", (16, 16), "red"), num_beams=2, max_new_tokens=3)) == 1
    model.train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    batch = {"text": ["a red square", "a blue square"], "pixel_values": torch.zeros(2, 3, 56, 56)}
    losses = []
    for _ in range(3):
        loss = Stage2Objective()(model, batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_every_interface_vlbridge_calls_is_documented(repo):
    from vlbridge.plugin.contract import INTERFACES
    from vlbridge.modeling.retrieval import RETRIEVAL_INTERFACE
    from vlbridge.modeling.connector_protocol import STAGE1_INTERFACE

    guide = (repo / "docs" / "writing-plugins.md").read_text(encoding="utf-8")
    names = {*STAGE1_INTERFACE, *RETRIEVAL_INTERFACE, *INTERFACES["llm"], "set_stage", "forward"}
    undocumented = sorted(name for name in names if not re.search(rf"`{name}[`(]", guide))  # `name` or `name(...)`
    assert not undocumented
