"""Deprecated alias: vlbridge.specs is now vlbridge.plugin.specs (this path goes in vlbridge 0.3)."""
# house-rewrite: off
import importlib
import sys
import warnings

warnings.warn("vlbridge.specs moved to vlbridge.plugin.specs; import that (the old path goes in vlbridge 0.3)",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("vlbridge.plugin.specs")
