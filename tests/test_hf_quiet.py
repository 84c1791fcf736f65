"""transformers' and huggingface_hub's progress bars stay out of vlbridge's output (CLI and the
build/load API), and a library caller's own settings come back after each call."""

from __future__ import annotations

import logging
import subprocess
import sys

from vlbridge.parts.hf_quiet import quiet_hf

BARS = ("Loading weights", "Writing model shards", "it/s]")
SCRIPT = """
import sys
from PIL import Image
import vlbridge
from vlbridge.cli.main import main
from transformers.utils import logging as hf_logging
from huggingface_hub.utils import are_progress_bars_disabled

out = sys.argv[1]
Image.new("RGB", (64, 64), "white").save(f"{out}/white.png")
model = vlbridge.build("world-qformer-opt")
model.save(f"{out}/ckpt")
vlbridge.load(f"{out}/ckpt")
assert main(["caption", "-c", f"{out}/ckpt", "--num-beams", "1", "--max-new-tokens", "2", f"{out}/white.png"]) == 0
vlbridge.build("tiny-qformer-opt").save(f"{out}/tiny")
assert main(["export", "hf-blip2", f"{out}/tiny", f"{out}/hf"]) == 0
print("AFTER", hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity(), are_progress_bars_disabled(), file=sys.stderr)
"""


def test_no_hf_progress_bars_in_cli_and_api_output(tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert not [bar for bar in BARS if bar in output], output[-3000:]
    assert f"AFTER True {logging.WARNING} False" in result.stderr  # the caller's settings (the defaults) are back


def test_the_callers_settings_come_back_nested():
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    disable_progress_bars("some.group")
    try:
        with quiet_hf():
            with quiet_hf():
                assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
            assert hf_logging.get_verbosity() == logging.ERROR and are_progress_bars_disabled()
        assert hf_logging.get_verbosity() == logging.INFO and hf_logging.is_progress_bar_enabled()
        assert not are_progress_bars_disabled() and are_progress_bars_disabled("some.group")
    finally:
        hf_logging.set_verbosity(before)
        enable_progress_bars()
