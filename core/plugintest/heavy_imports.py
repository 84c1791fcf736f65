"""Whether importing a plugin's registration module pulls in torch or another heavy stack.

vlbridge imports every registration module to list components and validate assemblies, which must
stay fast and torch-free (docs/writing-plugins.md, section 3). The import is tried in a fresh
interpreter, so the answer does not depend on what the calling process (a test suite, or the plugin
listing, which has imported every plugin) imported before; this module itself imports no torch.
"""

from __future__ import annotations

import os
import subprocess
import sys

HEAVY_MODULES = ("torch", "transformers", "timm", "open_clip", "torchvision")
# The answer comes on a line of its own after MARKER: what the module itself prints at import (a banner,
# a warning on stdout) is not a module name
MARKER = "vlbridge-heavy-imports:"
_PROBE = ("import importlib, sys; importlib.import_module(sys.argv[1]); "
          f"print('\\n{MARKER}', ' '.join(name for name in sys.argv[2:] if name in sys.modules))")


def heavy_imports(module_name: str) -> list[str]:
    """The heavy modules that importing `module_name` alone loads; [] when the import fails there
    (check_plugin's own import reports that failure)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # what this process can import
    result = subprocess.run([sys.executable, "-c", _PROBE, module_name, *HEAVY_MODULES], capture_output=True,
                            text=True, env=env, check=False, timeout=300)
    if result.returncode != 0 or MARKER not in result.stdout:
        return []
    return result.stdout.rsplit(MARKER, 1)[1].split()


def heavy_import_problem(heavy: list[str]) -> str:
    """Why a registration module that imports `heavy` is wrong, for check_plugin and the plugin
    listing to say after its name."""
    return (f"importing it imports {', '.join(heavy)}; vlbridge imports a registration module to list components and "
            "validate assemblies, which stay torch-free: import these in the module the factory string names instead "
            "(docs/writing-plugins.md, section 3)")
