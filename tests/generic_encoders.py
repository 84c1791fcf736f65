"""Shared by the tests of the generic encoders (`open-clip`, `hf-vision`): a registry that holds an
encoder plugin whether or not registry.yaml lists it yet, a short stage-1 Q-Former run on it, and the
encoder line `vlbridge validate` prints."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import yaml

import vlbridge
from vlbridge.cli.main import main
from vlbridge.plugin.registry import Registry, get_registry
from vlbridge.plugintest.check import registry_with
from vlbridge.train.objectives import objective_for

CAPTIONS = ["a cat sits on a red mat", "a dog runs in the green park", "two birds on a wire", "a cat sleeping on a mat"]


def registry_for(plugin: ModuleType, encoder: str) -> Registry:
    """The built-ins, plus `plugin` as a third-party plugin unless a built-in already declares `encoder`."""
    if encoder in get_registry().names("encoder"):
        return get_registry()
    return registry_with({f"vlbridge-{encoder}": plugin})


def stage1_losses(encoder: dict[str, Any], steps: int = 6) -> tuple[float, float]:
    """(loss before, loss after) `steps` AdamW steps of a tiny stage-1 Q-Former on `encoder`'s tokens,
    both measured in eval mode with fixed draws so that a drop is real."""
    assembly = {"name": "generic-encoder-stage1", "encoder": encoder,
                "connector": {"use": "qformer", "options": {"variant": "tiny", "num_query_tokens": 8}}}
    torch.manual_seed(0)
    model = vlbridge.build(assembly, stage=1).train()
    size = model.plan.preprocess.image_size
    pixels = torch.randn(len(CAPTIONS), 3, size, size, generator=torch.Generator().manual_seed(0))
    pixels[3] = pixels[0]
    image_index = torch.tensor([0, 1, 2, 0])
    batch = {"pixel_values": pixels, "text": list(CAPTIONS), "image_index": image_index,
             "image_id": [str(int(i)) for i in image_index], "index": torch.arange(len(CAPTIONS))}
    objective = objective_for(model)

    def evaluate() -> float:
        objective.generator = torch.Generator().manual_seed(0)
        model.eval()
        with torch.no_grad():
            loss = objective(model, batch)["loss"].item()
        model.train()
        objective.generator = None
        return loss

    before = evaluate()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        optimizer.zero_grad()
        objective(model, batch)["loss"].backward()
        optimizer.step()
    assert not any(p.requires_grad for p in model.encoder.parameters())  # the encoder stays frozen
    return before, evaluate()


def heavy_modules_after(script: str) -> list[str]:
    """Run `script` in a fresh interpreter; the heavy modules it imported (torch, transformers, ...)."""
    probe = script + "\nimport sys\nprint(sorted(m for m in ('torch', 'transformers', 'open_clip', 'timm', 'numpy') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return eval(result.stdout.strip().splitlines()[-1])  # a printed list of names




def validated_encoder_line(encoder: dict[str, Any], tmp_path: Path) -> str:
    """The encoder line `vlbridge validate` prints for `encoder` joined to a tiny Q-Former (stage 1)."""
    path = tmp_path / "assembly.yaml"
    path.write_text(yaml.safe_dump({"name": "generic-encoder-validate", "encoder": encoder,
                                    "connector": {"use": "qformer", "options": {"variant": "tiny"}}}))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["validate", str(path)]) == 0
    return next(line for line in out.getvalue().splitlines() if line.strip().startswith("encoder"))
