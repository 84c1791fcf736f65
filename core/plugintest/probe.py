"""Build a plugin's component on a dummy input and call on it what vlbridge will call.

`vlbridge.plugintest.check.check_plugin` runs this for every spec of a plugin, so that a plugin's author
learns about a missing method or a wrong shape from their own test, not from a user's traceback.
Each check mirrors a use: `vlbridge.build`'s shape check, the stage setting, the stage-1 and
stage-2 objectives (the real ones, on a stand-in for the model), and caption generation. Every
failure is a PluginError naming the component and what is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from vlbridge.assemblies.assembly import Resolved
from vlbridge.modeling.connector_protocol import set_connector_stage
from vlbridge.plugin.contract import build_component, check_llm, check_tokens, describe, plugin_call, tokenized
from vlbridge.errors import IncompatibleError, PluginError, VLBridgeError
from vlbridge.modeling.factory import _build_frozen  # the one place frozen parts are built
from vlbridge.plugin.specs import ConnectorSpec, EncoderSpec, LLMSpec, Spec, TokenShape
from vlbridge.assemblies.plan import split_size

PROBE_TEXTS = ["a red square", "a small blue circle on the left"]  # one per image of the dummy batch
PROBE_SEED = 0
ESTIMATE_TOLERANCE = 0.1  # a num_params() estimate (SizeEstimate) may be this far off the built module


def probe_component(spec: Spec, options: Any, pairs: Sequence[tuple[TokenShape, int]]) -> None:
    """Build `spec`'s component with `options` and exercise it; a connector is built for the first
    (encoder output, LLM width) of `pairs` that its output() accepts."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PROBE_SEED)
        if isinstance(spec, EncoderSpec):
            probe_encoder(spec, options)
        elif isinstance(spec, LLMSpec):
            probe_llm(spec, options)
        elif isinstance(spec, ConnectorSpec):
            probe_connector(spec, options, *accepted_pair(spec, options, pairs))


# -- encoders -------------------------------------------------------------------------------------
def probe_encoder(spec: EncoderSpec, options: Any) -> None:
    """Two blank images of the declared size in, (2, N, W) as declared out."""
    who = describe(spec)
    encoder = _build_frozen(Resolved(spec, options))
    size = spec.preprocess(options).image_size
    pixels = torch.zeros(2, 3, size, size)
    with torch.no_grad():
        out = plugin_call(who, f"forward on pixels of shape {tuple(pixels.shape)}", encoder, pixels)
    check_tokens(who, spec.output(options), out, batch=2)
    _check_frozen_count(who, spec, options, encoder)


# -- connectors -----------------------------------------------------------------------------------
def accepted_pair(spec: ConnectorSpec, options: Any, pairs: Sequence[tuple[TokenShape, int]]) -> tuple[TokenShape, int]:
    """The first of `pairs` the spec's output() accepts."""
    reasons = []
    for encoder_out, llm_width in pairs:
        try:
            plugin_call(describe(spec), "output()", spec.output, options, encoder_out, llm_width)
            return encoder_out, llm_width
        except IncompatibleError as exc:
            reasons.append(f"({encoder_out}, llm width {llm_width}): {exc}")
    raise PluginError(f"{describe(spec)} declined every probe input, so it cannot be built here ({'; '.join(reasons)}); "
                      "pass check_plugin(..., probe=(TokenShape(tokens, width), llm_width)) with inputs it accepts")


def probe_connector(spec: ConnectorSpec, options: Any, encoder_out: TokenShape, llm_width: int) -> None:
    """Each declared stage: its trainable count, then what that stage's training calls."""
    who = describe(spec)
    declared = spec.output(options, encoder_out, llm_width)
    connector = build_component(spec, options, encoder_out, llm_width)
    counts = spec.num_params(options, encoder_out, llm_width) if spec.num_params is not None else {}
    for stage in spec.stages:
        set_connector_stage(connector, stage, who)
        trained = sum(p.numel() for p in connector.parameters() if p.requires_grad)
        if trained == 0:
            raise PluginError(f"{who} trains no parameter in stage {stage}: set_stage({stage}) left every requires_grad off")
        if stage in counts and counts[stage] != trained:
            raise PluginError(f"{who}: num_params() declares {counts[stage]:,} trainable parameters in stage {stage} but the module "
                              f"trains {trained:,} (built for {encoder_out}, llm width {llm_width})")
        if stage == 1:
            _run_stage1(spec, connector, encoder_out)
        else:
            _run_forward(who, connector, encoder_out, declared)
    connector.eval()
    with torch.no_grad():
        out = _forward(who, "forward in eval mode", connector, torch.randn(2, encoder_out.num_tokens, encoder_out.width), ["", ""])
    check_tokens(who, declared, out, batch=2)


def _forward(who: str, what: str, connector: nn.Module, image_embeds: torch.Tensor, instructions: list[str]) -> Any:
    """The connector's forward as vlbridge calls it: an instruction-aware one also gets one
    instruction per image (the task prompt; "" when captioning), as in VLBridgeModel.visual_tokens."""
    if getattr(connector, "instruction_aware", False):
        return plugin_call(who, f"{what}, instructions={instructions!r}", connector, image_embeds, instructions=instructions)
    return plugin_call(who, what, connector, image_embeds)


def _run_forward(who: str, connector: nn.Module, encoder_out: TokenShape, declared: TokenShape) -> None:
    """Stage 2 trains through forward alone: (2, N, W) -> (2, M, D), and a gradient for every trainable parameter."""
    connector.train()
    image_embeds = torch.randn(2, encoder_out.num_tokens, encoder_out.width)
    out = check_tokens(who, declared, _forward(who, f"forward on shape {tuple(image_embeds.shape)}", connector, image_embeds, PROBE_TEXTS), batch=2)
    plugin_call(who, "backward through forward", out.float().square().mean().backward)
    _require_gradients(who, connector, "forward")


def _run_stage1(spec: ConnectorSpec, connector: nn.Module, encoder_out: TokenShape) -> None:
    """The real stage-1 objective (ITC + ITM + ITG) on two dummy images and captions."""
    from vlbridge.train.objectives import Stage1Objective

    who = describe(spec)
    model = SimpleNamespace(connector=connector, stage=1, device=torch.device("cpu"), training=True,  # a training pass
                            plan=SimpleNamespace(stages=spec.stages, connector=spec, encoder_out=encoder_out))
    batch = {"text": PROBE_TEXTS, "image_index": torch.arange(2),
             "image_embeds": torch.randn(2, encoder_out.num_tokens, encoder_out.width)}
    connector.train()
    losses = plugin_call(who, "the stage-1 objective", Stage1Objective(), model, batch)
    _backward(who, losses["loss"], "the stage-1 loss")
    _require_gradients(who, connector, "the stage-1 objective")


def _require_gradients(who: str, module: nn.Module, through: str) -> None:
    """Every trainable parameter got a gradient (DDP and the optimizer assume so); clears them."""
    trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    unused = [name for name, p in trainable if p.grad is None]
    module.zero_grad(set_to_none=True)
    if unused:
        shown = ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else "")
        raise PluginError(f"{who}: {len(unused)} trainable parameter(s) get no gradient through {through} ({shown}); "
                          "freeze what a stage does not use in set_stage(stage), and do not detach or use torch.no_grad in forward")


def _backward(who: str, loss: object, what: str) -> None:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not torch.isfinite(loss):
        raise PluginError(f"{who}: {what} is {loss!r}; it must be a finite scalar tensor")
    plugin_call(who, f"backward through {what}", loss.backward)


# -- LLMs -----------------------------------------------------------------------------------------
def probe_llm(spec: LLMSpec, options: Any) -> None:
    """The stage-2 objective's calls (tokenize, forward with labels, a gradient to the visual
    prompt), then generation as `model.caption` runs it (tokenize left-padded, generate, decode)."""
    from vlbridge.train.objectives import Stage2Objective

    who = describe(spec)
    dims = spec.dims(options)
    llm = _build_frozen(Resolved(spec, options))
    check_llm(llm, dims, who)
    _check_frozen_count(who, spec, options, llm)
    if not dims.encoder_decoder:
        _probe_prompt_prefix(who, llm)
    else:  # lmms-eval's scoring tokenizes an encoder-decoder's continuations without their end token
        tokenized(who, llm, list(PROBE_TEXTS), padding_side="right", add_special_tokens=False)
    visual = torch.zeros(2, 4, dims.embed_width, requires_grad=True)
    model = SimpleNamespace(llm=llm, stage=2, device=torch.device("cpu"), plan=SimpleNamespace(llm=spec, encoder_out=TokenShape(4, dims.embed_width)),
                            visual_tokens=lambda image_embeds, instructions=None: visual, training=True)  # a training pass
    outputs: list[Any] = []
    hook = llm.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        losses = plugin_call(who, "the stage-2 objective", Stage2Objective(), model, {"text": PROBE_TEXTS, "image_embeds": visual.detach()})
    finally:
        hook.remove()
    _check_vocab_size(who, dims.vocab_size, outputs)
    _backward(who, losses["loss"], "the stage-2 LM loss")
    if visual.grad is None:
        raise PluginError(f"{who}: the LM loss does not reach the visual prompt; forward must use visual_embeds without detaching them")
    _probe_generation(who, llm, visual.detach())


def _check_frozen_count(who: str, spec: EncoderSpec | LLMSpec, options: Any, module: nn.Module) -> None:
    """A declared frozen count is what `vlbridge validate` prints and what the memory plan sizes the
    part by, so it must be the built module's (None: not known from the options, nothing to check)."""
    declared, exact, _ = split_size(plugin_call(who, "num_params()", spec.num_params, options) if spec.num_params is not None else None)
    built = sum(p.numel() for p in module.parameters())
    if declared is not None and not exact and abs(declared - built) > ESTIMATE_TOLERANCE * built:
        raise PluginError(f"{who}: num_params() estimates {declared:,} frozen parameters but the built module has {built:,}, "
                          f"off by more than {ESTIMATE_TOLERANCE:.0%}; the memory plan sizes the part by it")
    if declared is not None and exact and declared != built:
        raise PluginError(f"{who}: num_params() declares {declared:,} frozen parameters but the built module has {built:,}; "
                          "validate and the memory plan report the declared count, so it must equal the module's "
                          "(return vlbridge.SizeEstimate(count, note) where only a generic formula fits: validate prints it as ~, "
                          f"and check_plugin allows {ESTIMATE_TOLERANCE:.0%} off; None where the options do not tell it)")


def _check_vocab_size(who: str, declared: int | None, outputs: list[Any]) -> None:
    """dims().vocab_size sizes the memory plan's fp32 log-probabilities: it must be the logits' width."""
    logits = getattr(outputs[-1], "logits", None) if outputs else None
    if declared is None or not isinstance(logits, torch.Tensor):
        return
    if logits.shape[-1] != declared:
        raise PluginError(f"{who}: dims() declares vocab_size={declared:,} but forward's logits are {logits.shape[-1]:,} wide "
                          f"(shape {tuple(logits.shape)}); the memory plan counts the LM loss's log-probabilities by it, "
                          "so declare the logits' width (or None)")


def _probe_prompt_prefix(who: str, llm: nn.Module) -> None:
    """A decoder-only LLM's training labels mask the prompt by its length tokenized alone, so the
    prompt's ids must begin the ids of prompt + caption: a tokenizer that appends an end token to
    every text (the guide's pitfall) makes the prompt one token longer than its place."""
    prompt = "Question: what is it? Short answer:"
    alone, _ = tokenized(who, llm, [prompt], padding_side="right")
    whole, _ = tokenized(who, llm, [prompt + " " + PROBE_TEXTS[0]], padding_side="right")
    alone, whole = alone[0].tolist(), whole[0].tolist()
    if whole[:len(alone)] != alone:
        raise PluginError(f"{who}: tokenize(prompt) gives {alone}, which does not begin tokenize(prompt + caption) = {whole}; "
                          "the stage-2 labels mask the prompt by its own length, so every token tokenize adds must come "
                          "first (a BOS), none after the text (an end token belongs in caption_suffix)")


def _probe_generation(who: str, llm: nn.Module, visual: torch.Tensor) -> None:
    from vlbridge.modeling.inference import GenerationOptions, check_new_tokens

    prompts = tokenized(who, llm, ["", PROBE_TEXTS[0]], padding_side="left")
    settings = GenerationOptions(max_new_tokens=3, num_beams=2).as_kwargs()
    try:
        new_tokens = plugin_call(who, "generate(visual_embeds, input_ids, attention_mask, ...)", llm.generate, visual, *prompts, **settings)
    except PluginError:
        raise
    except VLBridgeError as exc:  # the guide's way to say "no beam search here": then greedy decoding must work
        if "num_beams" not in str(exc):
            raise
        settings = GenerationOptions(max_new_tokens=3, num_beams=1).as_kwargs()
        new_tokens = plugin_call(who, "generate(visual_embeds, input_ids, attention_mask, num_beams=1, ...)", llm.generate,
                                 visual, *prompts, **settings)
    if not (isinstance(new_tokens, torch.Tensor) and new_tokens.dim() == 2 and new_tokens.shape[0] == 2):
        raise PluginError(f"{who}: generate must return the new token ids, a (batch, length) tensor; got {new_tokens!r}")
    check_new_tokens(who, new_tokens, settings["max_new_tokens"])
    texts = plugin_call(who, "decode(token_ids)", llm.decode, new_tokens)
    if not (isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)):
        raise PluginError(f"{who}: decode(token_ids) must return one string per row, got {texts!r}")
