"""Deprecated alias: vlbridge.attention is now vlbridge.parts.attention (this path goes in vlbridge 0.3)."""
# house-rewrite: off
import importlib
import sys
import warnings

warnings.warn("vlbridge.attention moved to vlbridge.parts.attention; import that (the old path goes in vlbridge 0.3)",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("vlbridge.parts.attention")
