"""vlbridge: BLIP-2 as a plugin framework. A frozen image encoder and a frozen LLM, bridged by a
small trainable connector, declared in YAML and validated before any weight loads.

Importing this package (and listing or validating plugins) never imports torch; the model-building
API is imported on first use.
"""

from __future__ import annotations

from typing import Any

from vlbridge.assemblies.assembly import Assembly, load_assembly
from vlbridge.errors import (
    AssemblyError,
    AssemblyWarning,
    IncompatibleError,
    PluginError,
    PluginWarning,
    UnknownComponentError,
    UntrainedWarning,
    VLBridgeError,
    WeightsError,
)
from vlbridge.plugin.hookspecs import hookimpl
from vlbridge.assemblies.plan import Plan
from vlbridge.plugin.registry import get_registry
from vlbridge.plugin.specs import ConnectorSpec, EncoderSpec, LLMDims, LLMSpec, Options, Preprocess, SizeEstimate, TokenShape

__version__ = "0.1.0"

__all__ = [
    "Assembly", "AssemblyError", "AssemblyWarning", "ConnectorSpec", "EncoderSpec", "IncompatibleError", "LLMDims", "LLMSpec",
    "Options", "Plan", "PluginError", "PluginWarning", "Preprocess", "SizeEstimate", "TokenShape", "UnknownComponentError", "UntrainedWarning",
    "VLBridgeError", "WeightsError", "get_registry", "hookimpl", "load_assembly",
]

# Torch-backed API, imported lazily so that listing and validation stay light: name -> "module:attr".
_LAZY: dict[str, str] = {
    "build": "vlbridge.modeling.factory:build",
    "load": "vlbridge.modeling.factory:load",
    "VLBridgeModel": "vlbridge.modeling.model:VLBridgeModel",
    "import_hf_blip2": "vlbridge.interop.hf_blip2:import_hf_blip2",
    "export_hf_blip2": "vlbridge.interop.hf_blip2:export_hf_blip2",
    "import_lavis": "vlbridge.interop.lavis:import_lavis",
    "import_hf_llava": "vlbridge.interop.hf_llava:import_hf_llava",
    "import_hf_instructblip": "vlbridge.interop.hf_instructblip:import_hf_instructblip",
    "export_hf_instructblip": "vlbridge.interop.hf_instructblip:export_hf_instructblip",
    "export_hf_llava": "vlbridge.interop.hf_llava:export_hf_llava",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, _, attr = _LAZY[name].partition(":")
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'vlbridge' has no attribute {name!r}")
