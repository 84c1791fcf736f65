"""What vlbridge calls on the modules that plugins' factories build, and errors that blame the plugin.

A factory and the module it returns are third-party code. Whatever goes wrong in them (an import
that fails, a factory that raises, a return value that is not a module, a missing method, an
output of the wrong shape) is reported as a PluginError naming the component, the distribution it
came from and what is wrong, never as vlbridge's internal error. `docs/writing-plugins.md`
documents each interface listed here; `vlbridge.plugintest.check.check_plugin` calls all of it. Importing
this module does not import torch (check_plugin(build=False) and validation stay light).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Protocol, TypeVar

from vlbridge.errors import PluginError, VLBridgeError
from vlbridge.plugin.specs import TokenShape

if TYPE_CHECKING:
    import torch
    from torch import nn

# What vlbridge reads or calls on each kind of built module besides `forward`. An encoder needs
# nothing more (its preprocessing is the spec's); a connector's `set_stage` and stage-1 interface
# are optional (vlbridge.modeling.connector_protocol).
INTERFACES: dict[str, tuple[str, ...]] = {
    "encoder": (),
    "connector": (),
    "llm": ("embed_width", "is_encoder_decoder", "caption_suffix", "tokenize", "decode", "generate"),
}

_Result = TypeVar("_Result")


class Component(Protocol):
    """A spec or a ComponentPlan: both know their kind, name and distribution."""

    kind: str
    name: str
    distribution: str | None


def describe(part: Component) -> str:
    """How every message names a component: "connector 'pool' (plugin vlbridge-pool)"."""
    origin = f" (plugin {part.distribution})" if part.distribution else ""
    return f"{part.kind} {part.name!r}{origin}"


def defines(obj: object, name: str) -> bool:
    """Whether `obj` has the attribute, without running it: a property (a tokenizer that loads on
    first use) is not evaluated, and an nn.Module's parameters, buffers and submodules count."""
    try:
        inspect.getattr_static(obj, name)
        return True
    except AttributeError:
        pass
    tables = (vars(obj).get(table) for table in ("_parameters", "_buffers", "_modules")) if hasattr(obj, "__dict__") else ()
    return any(isinstance(table, dict) and name in table for table in tables)  # an nn.Module's registered members


def missing(obj: object, names: tuple[str, ...] | list[str]) -> list[str]:
    return [name for name in names if not defines(obj, name)]


def require(obj: object, names: tuple[str, ...] | list[str], who: str, why: str) -> None:
    """Raise PluginError listing the attributes of `names` that `obj` lacks, and why they are needed."""
    absent = missing(obj, names)
    if absent:
        raise PluginError(f"{who}: its module ({type(obj).__name__}) lacks {', '.join(absent)}; {why}")


def plugin_call(who: str, what: str, fn: Callable[..., _Result], *args: Any, **kwargs: Any) -> _Result:
    """Run plugin code; an exception that is not already a VLBridgeError becomes a PluginError that
    names the component and the call (the cause stays chained for VLBRIDGE_DEBUG=1)."""
    try:
        return fn(*args, **kwargs)
    except VLBridgeError:
        raise
    except Exception as exc:
        raise PluginError(f"{who}: {what} raised {type(exc).__name__}: {exc}") from exc


def build_component(spec: Any, options: Any, *shape_args: Any) -> "nn.Module":
    """Import the spec's factory, call it, and check that it built an nn.Module with its kind's interface."""
    from torch import nn

    who = describe(spec)
    factory = plugin_call(who, f"importing its factory {spec.factory!r}", spec.load_factory)
    module = plugin_call(who, f"its factory {spec.factory!r}", factory, options, *shape_args)
    if not isinstance(module, nn.Module):
        raise PluginError(f"{who}: its factory {spec.factory!r} returned a {type(module).__name__}; "
                          "it must return a torch.nn.Module")
    require(module, INTERFACES[spec.kind], who, f"vlbridge calls these on every {spec.kind} (see docs/writing-plugins.md)"
            + _wrapper_hint(spec.kind, module))
    return module


def _wrapper_hint(kind: str, module: object) -> str:
    """A bare transformers model returned as an LLM: the wrappers that give it the interface exist."""
    if kind != "llm" or not any(cls.__name__ == "PreTrainedModel" for cls in type(module).__mro__):
        return ""
    return ("; a transformers model gets them all by returning vlbridge.plugins.llms.hf_causal_lm_model.CausalLM(model, "
            "tokenizer, end_token_id=..., caption_suffix=...) (hf_seq2seq_model.Seq2SeqLM for an encoder-decoder) from "
            "the factory (docs/writing-plugins.md, section 5.4)")


def check_llm(llm: Any, dims: Any, who: str) -> None:
    """The built LLM agrees with what its spec's dims() declared."""
    width = plugin_call(who, "embed_width", getattr, llm, "embed_width")
    if width != dims.embed_width:
        raise PluginError(f"{who} declared embedding width {dims.embed_width} but the built model embeds at {width}")
    if bool(llm.is_encoder_decoder) != dims.encoder_decoder:
        raise PluginError(f"{who} declared encoder_decoder={dims.encoder_decoder} but the built model's "
                          f"is_encoder_decoder is {llm.is_encoder_decoder}")
    if not isinstance(llm.caption_suffix, str):  # training appends it to every caption: a TypeError there named nothing
        raise PluginError(f"{who}: caption_suffix must be a string (\"\" if the tokenizer ends texts itself), got {llm.caption_suffix!r}")


def tokenized(who: str, llm: Any, texts: list[str], **kwargs: Any) -> "tuple[torch.Tensor, torch.Tensor]":
    """`llm.tokenize(texts, **kwargs)` held to the guide's interface (5.4): (input_ids, attention_mask),
    two (len(texts), length) int64 tensors. Lists (a transformers tokenizer without return_tensors)
    or a BatchEncoding failed later inside training or generation, as an error that named nothing."""
    import torch

    shown_args = "".join(f", {name}={value!r}" for name, value in kwargs.items())
    value = plugin_call(who, f"tokenize(texts{shown_args})", llm.tokenize, texts, **kwargs)
    if (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(t, torch.Tensor) for t in value)
            and value[0].dim() == 2 and value[0].shape == value[1].shape and value[0].shape[0] == len(texts)
            and value[0].dtype == value[1].dtype == torch.int64):
        return value[0], value[1]
    hint = ""
    if isinstance(value, Mapping):
        hint = "; for a transformers BatchEncoding return (encoded['input_ids'], encoded['attention_mask'])"
    elif isinstance(value, (tuple, list)) and any(isinstance(t, (list, tuple)) for t in value):
        hint = "; a transformers tokenizer gives tensors with return_tensors='pt'"
    raise PluginError(f"{who}: tokenize(texts{shown_args}) returned {_shown(value)} for {len(texts)} texts; "
                      f"it must return (input_ids, attention_mask), two ({len(texts)}, length) int64 tensors "
                      f"(docs/writing-plugins.md, 5.4){hint}")


def returned_tensor(who: str, what: str, value: object, shape: tuple[int | None, ...], meaning: str,
                    section: str = "5.3") -> "torch.Tensor":
    """`value`, returned by the plugin's `what`, must be a tensor of `shape` (None: any size there)."""
    import torch

    if isinstance(value, torch.Tensor) and value.dim() == len(shape) and all(n is None or n == m for n, m in zip(shape, value.shape)):
        return value
    wanted = "(" + ", ".join("?" if n is None else str(n) for n in shape) + ("," if len(shape) == 1 else "") + ")"
    raise PluginError(f"{who}: {what} returned {_shown(value)}; it must return {meaning}, a {wanted} tensor "
                      f"(docs/writing-plugins.md, {section})")


def _shown(value: object) -> str:
    """A plugin's return value, briefly: "a tuple of 2 (list, list)", "a (2, 5) torch.int32 tensor"."""
    if isinstance(value, (tuple, list)):
        items = ", ".join(_kind(item) for item in value[:3]) + (", ..." if len(value) > 3 else "")
        return f"a {type(value).__name__} of {len(value)} ({items})"
    return f"a {_kind(value)}"


def _kind(value: object) -> str:
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    return f"{tuple(shape)} {dtype} tensor" if shape is not None and dtype is not None else type(value).__name__


def check_tokens(who: str, declared: TokenShape, output: object, batch: int) -> "torch.Tensor":
    """`output` must be a (batch, tokens, width) tensor as the spec declared; returns it."""
    import torch

    if not isinstance(output, torch.Tensor):
        raise PluginError(f"{who}: forward returned a {type(output).__name__}; it must return one tensor of shape "
                          f"(batch, tokens, width) = ({batch}, {declared.num_tokens}, {declared.width})")
    shape = tuple(output.shape)
    if not output.is_floating_point():
        raise PluginError(f"{who}: forward returned a {output.dtype} tensor of shape {shape}; it must return floating-point "
                          f"(batch, tokens, width) = ({batch}, {declared.num_tokens}, {declared.width}) features")
    if len(shape) != 3 or shape[0] != batch:
        raise PluginError(f"{who}: forward returned shape {shape} for a batch of {batch}; it must return "
                          f"(batch, tokens, width) = ({batch}, {declared.num_tokens}, {declared.width})")
    if shape[1:] != (declared.num_tokens, declared.width):
        raise PluginError(f"{who} declared {declared} but produces {shape[1]} tokens x {shape[2]} (tensor shape {shape}); "
                          "its plugin's shape function is wrong")
    return output
