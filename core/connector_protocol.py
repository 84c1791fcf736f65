"""Deprecated alias: vlbridge.connector_protocol is now vlbridge.modeling.connector_protocol (this path goes in vlbridge 0.3)."""
# house-rewrite: off
import importlib
import sys
import warnings

warnings.warn("vlbridge.connector_protocol moved to vlbridge.modeling.connector_protocol; import that (the old path goes in vlbridge 0.3)",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("vlbridge.modeling.connector_protocol")
