"""Deprecated alias: vlbridge.testing is now vlbridge.plugintest.check (this path goes in vlbridge 0.3)."""
# house-rewrite: off
import importlib
import sys
import warnings

warnings.warn("vlbridge.testing moved to vlbridge.plugintest.check; import that (the old path goes in vlbridge 0.3)",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("vlbridge.plugintest.check")
