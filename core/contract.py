"""Deprecated alias: vlbridge.contract is now vlbridge.plugin.contract (this path goes in vlbridge 0.3)."""
# house-rewrite: off
import importlib
import sys
import warnings

warnings.warn("vlbridge.contract moved to vlbridge.plugin.contract; import that (the old path goes in vlbridge 0.3)",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("vlbridge.plugin.contract")
