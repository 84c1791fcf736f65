"""In-process fake plugins for tests: a connector written the way docs/writing-plugins.md describes
(a plain nn.Module, no set_stage), and plugins broken in each way a third-party one can be.

Factories are named by "tests.fake_plugins:NAME" strings, as a real plugin's are.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

import vlbridge
from vlbridge import ConnectorSpec, EncoderSpec, LLMDims, LLMSpec, Options, TokenShape
from vlbridge.plugin.specs import Preprocess
from vlbridge.plugintest.check import registry_with

NUM_TOKENS = 4  # the pool connector's visual tokens


class MeanPool(nn.Module):
    """(B, N, W) -> (B, NUM_TOKENS, D): average-pool the tokens, then a linear map. No set_stage."""

    def __init__(self, encoder_width: int, llm_width: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool1d(NUM_TOKENS)
        self.proj = nn.Linear(encoder_width, llm_width)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(image_embeds.transpose(1, 2)).transpose(1, 2))


class WithSetStage(MeanPool):
    """Declares stage 1 and has set_stage, but none of the stage-1 interface."""

    def set_stage(self, stage: int) -> None:
        self.requires_grad_(True)


class ForwardRaises(MeanPool):
    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        raise ValueError("pooling exploded")


class LosesBatch(MeanPool):
    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return super().forward(image_embeds)[:1]


class UnusedParameter(MeanPool):
    def __init__(self, encoder_width: int, llm_width: int):
        super().__init__(encoder_width, llm_width)
        self.spare = nn.Linear(2, 2)


def build_pool(opts: Any, encoder_out: TokenShape, llm_width: int) -> nn.Module:
    return MeanPool(encoder_out.width, llm_width)


class InstructedPool(MeanPool):
    """Instruction-aware (guide 5.2b): vlbridge always passes one instruction per image."""

    instruction_aware = True

    def forward(self, image_embeds: torch.Tensor, instructions: list[str]) -> torch.Tensor:
        if len(instructions) != image_embeds.shape[0]:
            raise ValueError(f"{len(instructions)} instructions for {image_embeds.shape[0]} images")
        return super().forward(image_embeds)


def build_instructed(opts: Any, encoder_out: TokenShape, llm_width: int) -> nn.Module:
    return InstructedPool(encoder_out.width, llm_width)


def build_with_set_stage(opts: Any, encoder_out: TokenShape, llm_width: int) -> nn.Module:
    return WithSetStage(encoder_out.width, llm_width)


def build_wrong_width(opts: Any, encoder_out: TokenShape, llm_width: int) -> nn.Module:
    """Declares the LLM's width (pool_output) but builds its visual tokens one wider."""
    return MeanPool(encoder_out.width, llm_width + 1)


def build_raises(opts: Any, encoder_out: TokenShape, llm_width: int) -> nn.Module:
    raise RuntimeError("cannot find my weights")


def build_reads_a_value(opts: Any, encoder_out: TokenShape, llm_width: int) -> nn.Module:
    """Reads a value of a tensor it made while building (here a scale), which a real build can and a
    build on the meta device cannot."""
    module = MeanPool(encoder_out.width, llm_width)
    module.scale = float(torch.ones(1).sum().item())
    return module


def build_not_a_module(opts: Any, encoder_out: TokenShape, llm_width: int) -> dict:
    return {"proj": None}


def build_forward_raises(opts: Any, encoder_out: TokenShape, llm_width: int) -> nn.Module:
    return ForwardRaises(encoder_out.width, llm_width)


def build_loses_batch(opts: Any, encoder_out: TokenShape, llm_width: int) -> nn.Module:
    return LosesBatch(encoder_out.width, llm_width)


def build_unused_parameter(opts: Any, encoder_out: TokenShape, llm_width: int) -> nn.Module:
    return UnusedParameter(encoder_out.width, llm_width)


class TupleWhileTraining(MeanPool):
    """Answers a tensor in eval mode (the build's shape check passes) but a tuple while training."""

    def forward(self, image_embeds: torch.Tensor) -> Any:
        out = super().forward(image_embeds)
        return (out,) if self.training else out


def build_tuple_while_training(opts: Any, encoder_out: TokenShape, llm_width: int) -> nn.Module:
    return TupleWhileTraining(encoder_out.width, llm_width)


class FirstImageOnly(nn.Module):
    """The plain encoder, but it answers for the first image only: the build's one-image check passes."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = build_plain_encoder(None)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.inner(pixel_values[:1])


def build_first_image_only_encoder(opts: Any) -> nn.Module:
    return FirstImageOnly()


def build_plain_encoder(opts: Any) -> nn.Module:
    """A bare encoder: (B, 3, 28, 28) -> (B, 16, 8) by 7x7 patches, no preprocess attribute."""
    return nn.Sequential(nn.Conv2d(3, 8, kernel_size=7, stride=7), nn.Flatten(2), Transpose())


class BlockEncoder(nn.Module):
    """A plain encoder (no FrozenPart) with a `blocks` list and dropout in every block, as most ViTs have:
    (B, 3, 28, 28) -> (B, 16, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Sequential(nn.Conv2d(3, 8, kernel_size=7, stride=7), nn.Flatten(2), Transpose())
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)) for _ in range(2))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixel_values)
        for block in self.blocks:
            x = x + block(x)
        return x


def build_block_encoder(opts: Any) -> nn.Module:
    return BlockEncoder()


def build_bare_llm(opts: Any) -> nn.Module:
    return nn.Linear(64, 64)  # none of the LLM interface


def build_unwrapped_llm(opts: Any) -> nn.Module:
    """The tiny OPT's transformers model itself, not wrapped in CausalLM: what a first LLM plugin returns."""
    from vlbridge.plugins.llms.opt import OPTOptions
    from vlbridge.plugins.llms.opt_model import build

    return build(OPTOptions(variant="tiny")).model


def build_blockless_llm(opts: Any) -> nn.Module:
    """The tiny OPT with its transformers `_no_split_modules` hidden: it lists no blocks to checkpoint or shard."""
    from vlbridge.plugins.llms.opt import OPTOptions
    from vlbridge.plugins.llms.opt_model import build

    llm = build(OPTOptions(variant="tiny"))
    for module in llm.modules():
        module._no_split_modules = None
    return llm


def build_greedy_only_llm(opts: Any) -> nn.Module:
    """The tiny OPT, refusing beam search the way the guide asks (a VLBridgeError naming num_beams)."""
    from vlbridge.plugins.llms.opt import OPTOptions
    from vlbridge.plugins.llms.opt_model import build

    llm = build(OPTOptions(variant="tiny"))
    generate = llm.generate

    def greedy_only(*args: Any, num_beams: int = 1, **kwargs: Any) -> torch.Tensor:
        if num_beams > 1:
            raise vlbridge.VLBridgeError(f"greedy-only: num_beams={num_beams} is not supported; use num_beams=1")
        return generate(*args, num_beams=num_beams, **kwargs)

    llm.generate = greedy_only
    return llm


def build_list_tokenize_llm(opts: Any) -> nn.Module:
    """The tiny OPT whose tokenize returns Python lists instead of tensors."""
    from vlbridge.plugins.llms.opt import OPTOptions
    from vlbridge.plugins.llms.opt_model import build

    llm = build(OPTOptions(variant="tiny"))
    tokenize = llm.tokenize
    llm.tokenize = lambda texts, **kwargs: tuple(t.tolist() for t in tokenize(texts, **kwargs))
    return llm


def build_lossless_llm(opts: Any) -> nn.Module:
    """The tiny OPT whose forward leaves `loss` None even when it is given labels."""
    from types import SimpleNamespace

    from vlbridge.plugins.llms.opt import OPTOptions
    from vlbridge.plugins.llms.opt_model import build

    llm = build(OPTOptions(variant="tiny"))

    class Lossless(type(llm)):  # type: ignore[misc]
        def forward(self, *args: Any, **kwargs: Any) -> SimpleNamespace:
            return SimpleNamespace(loss=None, logits=super().forward(*args, **kwargs).logits)

    llm.__class__ = Lossless
    return llm


def build_joined_decode_llm(opts: Any) -> nn.Module:
    """The tiny OPT whose decode joins its rows into one string instead of a list."""
    from vlbridge.plugins.llms.opt import OPTOptions
    from vlbridge.plugins.llms.opt_model import build

    llm = build(OPTOptions(variant="tiny"))
    decode = llm.decode
    llm.decode = lambda token_ids: " | ".join(decode(token_ids))
    return llm


def build_end_token_llm(opts: Any) -> nn.Module:
    """The tiny OPT whose tokenize appends an end token to every text: the guide's pitfall."""
    from vlbridge.plugins.llms.opt import OPTOptions
    from vlbridge.plugins.llms.opt_model import build

    llm = build(OPTOptions(variant="tiny"))
    tokenize = llm.tokenize

    def with_end(texts: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return tokenize([text + "</s>" for text in texts], **kwargs)

    llm.tokenize = with_end
    return llm


class InterfaceOnly(nn.Module):
    """The tiny OPT behind exactly the members the guide's LLM tables list (no `tokenizer`, no `model`),
    as a hand-written LLM plugin has them."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.embed_width, self.is_encoder_decoder = inner.embed_width, inner.is_encoder_decoder
        self.caption_suffix = inner.caption_suffix

    def tokenize(self, texts: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.tokenize(texts, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.inner.generate(*args, **kwargs)

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        return self.inner.decode(token_ids)


def build_plain_llm_with_model(opts: Any) -> nn.Module:
    """The tiny OPT's interface on a plain nn.Module (no FrozenPart) that shows its transformers model as
    `model`, where LoRA's adapters go."""
    llm = build_interface_only_llm(opts)
    llm.model = llm.inner.model
    return llm


def build_interface_only_llm(opts: Any) -> nn.Module:
    from vlbridge.plugins.llms.opt import OPTOptions
    from vlbridge.plugins.llms.opt_model import build

    return InterfaceOnly(build(OPTOptions(variant="tiny")))


def build_chat_messages_llm(opts: Any) -> nn.Module:
    """An LLM whose format_prompt returns chat messages (a list of dicts) instead of the prompt's text."""
    llm = build_interface_only_llm(opts)
    llm.format_prompt = lambda prompt: [{"role": "user", "content": prompt}]
    return llm


def build_suffixless_llm(opts: Any) -> nn.Module:
    """An LLM whose caption_suffix is None (it should be "" when the tokenizer ends texts itself)."""
    llm = build_interface_only_llm(opts)
    llm.caption_suffix = None
    return llm


def build_prompt_echo_llm(opts: Any) -> nn.Module:
    """The tiny OPT whose generate returns the prompt's ids before the new ones (transformers' generate
    on input_ids does), which decode would read as part of the answer."""
    llm = build_interface_only_llm(opts)
    generate = llm.generate
    llm.generate = lambda visual, ids, mask, **kwargs: torch.cat([ids, generate(visual, ids, mask, **kwargs)], dim=1)
    return llm


def build_text_logits_llm(opts: Any) -> nn.Module:
    """The tiny OPT whose forward returns the text positions' logits only, dropping the visual ones."""
    llm = build_interface_only_llm(opts)
    forward = llm.forward

    def text_only(visual: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        output = forward(visual, *args, **kwargs)
        return types.SimpleNamespace(loss=output.loss, logits=output.logits[:, visual.shape[1]:])

    llm.forward = text_only
    return llm


def build_t5_without_special_token_choice(opts: Any) -> nn.Module:
    """The tiny FlanT5 whose tokenize takes only max_length and padding_side: lmms-eval's scoring of an
    encoder-decoder also passes add_special_tokens=False."""
    from vlbridge.plugins.llms.flan_t5 import FlanT5Options
    from vlbridge.plugins.llms.flan_t5_model import build

    llm = build(FlanT5Options(variant="tiny"))
    tokenize = llm.tokenize
    llm.tokenize = lambda texts, max_length=None, padding_side="right": tokenize(texts, max_length=max_length, padding_side=padding_side)
    return llm


def tiny_t5_spec(factory: str, name: str) -> LLMSpec:
    from vlbridge.plugins.llms.flan_t5 import FlanT5Options, dims

    return LLMSpec(name=name, factory=f"tests.fake_plugins:{factory}", options=FlanT5Options,
                   dims=lambda o: dims(FlanT5Options(variant="tiny")))


def tiny_opt_spec(factory: str, name: str) -> LLMSpec:
    from vlbridge.plugins.llms.opt import OPTOptions, dims

    return LLMSpec(name=name, factory=f"tests.fake_plugins:{factory}", options=OPTOptions,
                   dims=lambda o: dims(OPTOptions(variant="tiny")))  # the factories build the tiny OPT


class Transpose(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


def pool_output(opts: Any, encoder_out: TokenShape, llm_width: int) -> TokenShape:
    return TokenShape(NUM_TOKENS, llm_width)


def pool_params(opts: Any, encoder_out: TokenShape, llm_width: int) -> dict[int, int]:
    return {2: encoder_out.width * llm_width + llm_width}


def plugin(name: str = "pool", **hooks: list) -> types.ModuleType:
    """A plugin module whose hooks return the given specs (by hook kind: connectors, encoders, llms)."""
    module = types.ModuleType(f"fake_{name}")
    for kind, specs in hooks.items():
        def hook(specs=specs):
            return specs

        hook.__name__ = f"vlbridge_register_{kind}"
        setattr(module, hook.__name__, vlbridge.hookimpl(hook))
    return module


def connector_plugin(factory: str = "build_pool", name: str = "pool", stages: tuple[int, ...] = (2,),
                     output: Any = pool_output, num_params: Any = pool_params) -> types.ModuleType:
    spec = ConnectorSpec(name=name, factory=f"tests.fake_plugins:{factory}", options=Options, output=output,
                         num_params=num_params, stages=stages)
    return plugin(name, connectors=[spec])


def plain_encoder_spec(factory: str = "build_plain_encoder", width: int = 8) -> EncoderSpec:
    return EncoderSpec(name="patches", factory=f"tests.fake_plugins:{factory}", output=lambda o: TokenShape(16, width),
                       preprocess=lambda o: Preprocess(28, (0.5,) * 3, (0.5,) * 3))


def bare_llm_spec() -> LLMSpec:
    return LLMSpec(name="bare", factory="tests.fake_plugins:build_bare_llm", dims=lambda o: LLMDims(64, 128, False))


def registry(**plugins: types.ModuleType):
    """The built-ins plus `plugins`, each registered as distribution 'vlbridge-NAME'."""
    return registry_with({f"vlbridge-{name}": module for name, module in plugins.items()})


def assembly(connector: str = "pool", encoder: str = "eva-vit-g", llm: str = "opt") -> dict[str, Any]:
    """A tiny assembly around the given components (built-ins get their tiny variants)."""
    def ref(use: str) -> dict[str, Any]:
        return {"use": use, "options": {"variant": "tiny"}} if use in ("eva-vit-g", "clip-vit-l", "opt", "flan-t5") else {"use": use}

    return {"name": f"tiny-{connector}", "encoder": ref(encoder), "connector": ref(connector), "llm": ref(llm)}
