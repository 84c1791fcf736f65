"""Listing plugins and validating assemblies must not import torch (nor transformers / open_clip)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
import vlbridge
from vlbridge.cli.main import main
for argv in (["plugins", "--json"], ["components", "--json"], ["presets"], ["validate", "blip2-opt-2.7b"],
             ["validate", "llava-mlp-opt-2.7b", "--json"], ["validate", "no-such-preset"]):
    main(argv)
for preset in ("blip2-flan-t5-xxl", "tiny-qformer-opt", "world-qformer-opt", "world-qformer-flan-t5"):
    vlbridge.load_assembly(preset)
heavy = sorted(m for m in ("torch", "transformers", "open_clip", "xformers", "numpy") if m in sys.modules)
print("HEAVY", heavy, file=sys.stderr)
sys.exit(1 if heavy else 0)
"""


def test_listing_and_validating_never_import_torch():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "HEAVY []" in result.stderr
