"""LoRA adapters on the frozen LLM (the LLaVA / TinyLLaVA recipe), through peft.

The adapters are injected in place (peft's `inject_adapter_in_model`) into the transformers model
the LLM wrapper holds, so `model.llm.model` stays that transformers model and every wrapper method
(forward, generate, the shared-prefix cache) runs unchanged: each targeted Linear becomes peft's
LoRA layer, with its original weight as `base_layer` (frozen) and `lora_A` / `lora_B` (trained).
The LLM's own modules stay in eval mode while the model trains; the adapters' dropout follows the
model's mode.

Formats without adapters (transformers' BLIP-2 and LLaVA) get `merged_llm_model(model)`: a copy of
the LLM with every adapter merged into its base weight. Only the adapted layers get their own weights;
every other tensor is shared with the live model, which is left as it was.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Mapping

from torch import nn

from vlbridge.errors import VLBridgeError
from vlbridge.parts.freeze import FrozenPart

ADAPTER = "default"  # peft's adapter name; one adapter per model
SETTINGS = ("r", "alpha", "dropout", "target_modules")  # what a checkpoint records to rebuild the adapters


def default_targets(llm_model: nn.Module) -> list[str]:
    """peft's default LoRA targets for the model's type (q_proj, v_proj for OPT / Llama; q, v for T5)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(getattr(llm_model, "config", None), "model_type", None)
    targets = DEFAULTS.get(model_type) if model_type else None
    if not targets:
        raise VLBridgeError(f"finetune.lora.target_modules: peft has no default LoRA targets for model type {model_type!r}; "
                            f"name them, e.g. {linear_names(llm_model)[:6]}, or use all-linear")
    return list(targets)


def linear_names(llm_model: nn.Module) -> list[str]:
    """The distinct last names of the model's Linear layers (what target_modules matches)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in llm_model.named_modules() if isinstance(module, nn.Linear)})


def resolve_settings(llm_model: nn.Module, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings with the targets made explicit (peft's defaults when none are given)."""
    missing = [key for key in SETTINGS if key not in settings]
    if missing:
        raise VLBridgeError(f"LoRA settings lack {missing}; expected {list(SETTINGS)}")
    targets = settings["target_modules"]
    resolved = {key: settings[key] for key in SETTINGS}
    resolved["target_modules"] = default_targets(llm_model) if targets is None else (
        targets if isinstance(targets, str) else list(targets))
    return resolved


def has_lora(llm_model: nn.Module) -> bool:
    return any(_is_lora_name(name) for name, _ in llm_model.named_parameters())


def add_lora(llm: nn.Module, settings: Mapping[str, Any], *, trainable: bool = True) -> dict[str, Any]:
    """Inject fresh adapters (B = 0: the LLM computes as before) into the wrapper's transformers model;
    returns the resolved settings to record. Adapter weights are fp32 whatever the LLM's dtype."""
    from peft import LoraConfig, inject_adapter_in_model

    model = llm.model
    if has_lora(model):
        raise VLBridgeError("the LLM already holds LoRA adapters; one set per model")
    resolved = resolve_settings(model, settings)
    config = LoraConfig(r=int(resolved["r"]), lora_alpha=resolved["alpha"], lora_dropout=float(resolved["dropout"]),
                        target_modules=resolved["target_modules"], bias="none")
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise VLBridgeError(f"finetune.lora.target_modules: {resolved['target_modules']} matches no layer peft can adapt in "
                            f"{type(model).__name__} ({exc}); its Linear layers are named {linear_names(model)}") from None
    for param in lora_parameters(model).values():
        param.data = param.data.float()
        param.requires_grad_(trainable)
    if isinstance(llm, FrozenPart):
        llm.train_along(lora_dropouts(model))
    return resolved


def lora_parameters(llm_model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters' parameters by their name in the transformers model."""
    return {name: param for name, param in llm_model.named_parameters() if _is_lora_name(name)}


def lora_dropouts(llm_model: nn.Module) -> list[nn.Module]:
    return [module for name, module in llm_model.named_modules() if ".lora_dropout." in f".{name}."]


def _is_lora_name(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def merged_llm_model(model: Any) -> nn.Module:
    """The LLM's transformers model with its LoRA adapters merged into the base weights, for formats
    without adapters; the live model itself when it has none. The live model is left unchanged:
    the adapted layers get their own copies before merging, every other tensor is shared. An adapted
    layer whose weight is tied to another (an LM head tied to the input embeddings) is untied, and
    the copy's config says so: merging into the shared tensor would change the embeddings too, and
    an export saving one matrix for both would lose the merge."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    live = model.llm.model
    if not any(isinstance(module, BaseTunerLayer) for module in live.modules()):
        return live
    shared = {id(t): t for t in itertools.chain(live.parameters(), live.buffers())}
    merged = copy.deepcopy(live, memo=dict(shared))
    for name, module in [(n, m) for n, m in merged.named_modules() if isinstance(m, BaseTunerLayer)]:
        _own_tensors(module.get_base_layer())
        module.merge(adapter_names=[ADAPTER])
        parent_name, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent_name) if parent_name else merged, child, module.get_base_layer())
    if "peft_config" in merged.__dict__:
        del merged.__dict__["peft_config"]
    _record_untied_head(merged)
    return merged


def _own_tensors(layer: nn.Module) -> None:
    """Give `layer` copies of its parameters and buffers, so merging into them touches nothing shared."""
    for key, param in list(layer.named_parameters(recurse=False)):
        setattr(layer, key, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
    for key, buffer in list(layer.named_buffers(recurse=False)):
        setattr(layer, key, buffer.clone())


def _record_untied_head(merged: nn.Module) -> None:
    """Where merging gave the LM head a weight of its own, its config must not tie it back."""
    config = getattr(merged, "config", None)
    head = merged.get_output_embeddings() if hasattr(merged, "get_output_embeddings") else None
    embeddings = merged.get_input_embeddings() if hasattr(merged, "get_input_embeddings") else None
    if config is None or head is None or embeddings is None or head.weight is embeddings.weight:
        return
    if getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False  # the deep copy's own config: the live model's still ties
