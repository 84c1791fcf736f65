"""Deprecated alias: vlbridge.hookspecs is now vlbridge.plugin.hookspecs (this path goes in vlbridge 0.3)."""
# house-rewrite: off
import importlib
import sys
import warnings

warnings.warn("vlbridge.hookspecs moved to vlbridge.plugin.hookspecs; import that (the old path goes in vlbridge 0.3)",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("vlbridge.plugin.hookspecs")
