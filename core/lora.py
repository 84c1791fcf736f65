"""Deprecated alias: vlbridge.lora is now vlbridge.finetune.lora (this path goes in vlbridge 0.3)."""
# house-rewrite: off
import importlib
import sys
import warnings

warnings.warn("vlbridge.lora moved to vlbridge.finetune.lora; import that (the old path goes in vlbridge 0.3)",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("vlbridge.finetune.lora")
