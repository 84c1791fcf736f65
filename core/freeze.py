"""Deprecated alias: vlbridge.freeze is now vlbridge.parts.freeze (this path goes in vlbridge 0.3)."""
# house-rewrite: off
import importlib
import sys
import warnings

warnings.warn("vlbridge.freeze moved to vlbridge.parts.freeze; import that (the old path goes in vlbridge 0.3)",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("vlbridge.parts.freeze")
