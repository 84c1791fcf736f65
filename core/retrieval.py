"""Deprecated alias: vlbridge.retrieval is now vlbridge.modeling.retrieval (this path goes in vlbridge 0.3)."""
# house-rewrite: off
import importlib
import sys
import warnings

warnings.warn("vlbridge.retrieval moved to vlbridge.modeling.retrieval; import that (the old path goes in vlbridge 0.3)",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("vlbridge.modeling.retrieval")
