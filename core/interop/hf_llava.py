"""Import from, and export to, transformers' LLaVA format (`LlavaForConditionalGeneration`
save_pretrained directories such as a local copy of llava-hf/llava-1.5-7b-hf).

LLaVA is an assembly vlbridge already has the parts for: its vision tower becomes an `hf-vision`
encoder (the layer `vision_feature_layer`, [CLS] dropped for the "default" select strategy), its
`multi_modal_projector` (linear_1, act, linear_2) the `mlp` connector, its language model an
`hf-causal-lm` whose prompt holds the `<image>` placeholder where the visual tokens go. Import
writes the tower and the language model as their own transformers directories, the projector as
the connector's weights and the assembly that binds them; `vlbridge.load(out)` then gives
transformers' logits and generations. Export goes back from such a model.

LLaVA keeps every token of the chosen hidden state ("full") or all but the first ("default"), and
computes its logits with the bare lm_head: the language model's own logit settings (Gemma-2's
final soft cap, Cohere's and Granite's scales) do not apply inside it. Import writes the language
model with those settings neutral, so it computes what LLaVA computes; export refuses a model
whose token selection or logit settings LLaVA cannot hold (or, for the logits, exports it
approximately when asked).
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any

import torch

from vlbridge.files.atomic import atomic_write_text
from vlbridge.files.checkpoint import write_checkpoint
from vlbridge.files.userfiles import read_json
from vlbridge.errors import VLBridgeError
from vlbridge.interop.import_checks import check_imported_assembly
from vlbridge.interop.stop_token import carry_generation_config, checkpoint_eos, export_text_config, stop_token_option
from vlbridge.interop.export_state import require_stage2
from vlbridge.interop.export_fidelity import PROBE_PROMPT, eval_logits, max_logit_difference, probe_pixels, prompt_places_visual_tokens, settle
from vlbridge.files.hf_config import load_failure, transformers_config
from vlbridge.interop.hf_processor import llava_image_processor, write_export

LLAVA_15_TEMPLATE = "USER: <image>\n{} ASSISTANT:"  # LLaVA-1.5's conversation format (llava-hf's chat template renders it)
SELECT_STRATEGIES = {"default": False, "full": True}  # -> include_cls
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_FIX = "give a directory written by LlavaForConditionalGeneration.save_pretrained (config.json, weights, tokenizer)"


def read_llava_config(src: Path) -> dict[str, Any]:
    config = transformers_config(src, "llava", "LlavaForConditionalGeneration")
    path = src / "config.json"
    layer = config.get("vision_feature_layer", -2)
    if isinstance(layer, list) and len(layer) == 1 and isinstance(layer[0], int):
        config = {**config, "vision_feature_layer": layer[0]}  # a list of one layer is that layer: nothing to concatenate
    elif not isinstance(layer, int):
        raise VLBridgeError(f"{path}: vision_feature_layer {layer!r} concatenates several layers; vlbridge's hf-vision encoder "
                            "takes one layer, so this LLaVA variant cannot be imported exactly")
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy not in SELECT_STRATEGIES:
        raise VLBridgeError(f"{path}: vision_feature_select_strategy {strategy!r} is unknown; expected one of {sorted(SELECT_STRATEGIES)}")
    act = config.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise VLBridgeError(f"{path}: projector_hidden_act {act!r}; vlbridge's mlp connector uses GELU (LLaVA-1.5's mlp2x_gelu)")
    missing = [key for key in ("vision_config", "text_config") if not isinstance(config.get(key), dict)]
    if missing:  # transformers would build its defaults (a CLIP ViT-L, a 7B Llama) before finding the weights do not fit
        raise VLBridgeError(f"{path} has no {' and no '.join(missing)} object; give the config.json that "
                            "LlavaForConditionalGeneration.save_pretrained wrote with these weights")
    return config


def _import_selection(config: dict[str, Any], path: Path) -> dict[str, bool]:
    """The hf-vision options that keep the tokens LLaVA's select strategy keeps: all of them ("full"),
    or all but the first ("default"), which hf-vision can drop only where it is the tower's one [CLS]."""
    from transformers import LlavaConfig

    from vlbridge.plugins.encoders.hf_vision_configs import describe_tower

    try:
        facts = describe_tower(LlavaConfig.from_dict(config).vision_config.to_dict(), f"{path} vision_config", None)
    except ValueError as exc:
        raise VLBridgeError(f"{path}: {exc}") from None
    registers = {"include_registers": True} if facts.registers else {}  # LLaVA keeps a tower's register tokens
    if SELECT_STRATEGIES[config.get("vision_feature_select_strategy", "default")]:
        return {"include_cls": True, **registers}
    if facts.cls_tokens != 1:
        raise VLBridgeError(f"{path}: vision_feature_select_strategy 'default' drops the first token of the hidden state, which "
                            f"in a {facts.model_type} tower ({facts.cls_tokens} class tokens) is "
                            f"{'a patch' if facts.cls_tokens == 0 else 'one of its class tokens'}; hf-vision keeps or drops "
                            "whole groups of tokens, so this LLaVA cannot be imported exactly")
    return {"include_cls": False, **registers}


def _load_llava(src: Path) -> Any:
    """The LLaVA model, loaded strictly: a tensor missing from its files would import at random."""
    from transformers import LlavaForConditionalGeneration

    from vlbridge.plugins.llms.loading import check_loading_info

    try:
        model, info = LlavaForConditionalGeneration.from_pretrained(str(src), dtype="auto", local_files_only=True,
                                                                    output_loading_info=True)
    except Exception as exc:  # transformers raises many types for a broken file
        raise load_failure("LlavaForConditionalGeneration weights", src, exc, _FIX) from exc
    check_loading_info(info, f"the LlavaForConditionalGeneration weights in {str(src)!r}")
    return model


def _causal_lm(text_config: Any, language_model: torch.nn.Module, lm_head: torch.nn.Module) -> Any:
    """A standalone AutoModelForCausalLM holding LLaVA's language model and head (shared tensors, no copy)."""
    from transformers import AutoModelForCausalLM

    text_config = copy.deepcopy(text_config)
    for name in head_settings(text_config):  # LLaVA's logits are its bare lm_head's: leave them as LLaVA computes them
        setattr(text_config, name, LM_HEAD_ONLY[name])
    with torch.device("meta"):
        causal = AutoModelForCausalLM.from_config(text_config)
    state = {f"model.{k}": v for k, v in language_model.state_dict().items()}
    state.update({f"lm_head.{k}": v for k, v in lm_head.state_dict().items()})
    if getattr(causal.lm_head, "bias", None) is not None and "lm_head.bias" not in state:  # Phi's head has one, LLaVA's none:
        state["lm_head.bias"] = torch.zeros(causal.lm_head.out_features, dtype=lm_head.weight.dtype)  # zeros compute the same
    causal.load_state_dict(state, strict=True, assign=True)
    causal.tie_weights()
    return causal


def _processor_settings(src: Path) -> dict[str, dict[str, Any]]:
    """The processor's settings files of `src`, parsed. The import writes back only what parsed: a hub
    cache links these files to blobs, so a link is followed, and copying the file as it was would
    carry whatever a link points at (a key, a password file) into the checkpoint."""
    return {name: read_json(src / name, "the LLaVA processor's settings", top=dict)
            for name in PROCESSOR_FILES if (src / name).is_file()}


def _image_token(tokenizer: Any, index: int) -> str:
    token = tokenizer.convert_ids_to_tokens(index)
    if not isinstance(token, str) or tokenizer(token, add_special_tokens=False)["input_ids"] != [index]:
        raise VLBridgeError(f"the tokenizer has no single token for image_token_index {index}; save the LLaVA processor's "
                            "tokenizer (it carries '<image>') into the directory")
    return token


def import_hf_llava(src_dir: str | Path, out_dir: str | Path, name: str | None = None,
                    prompt_template: str | None = None) -> Path:
    """Convert a transformers LLaVA directory into a vlbridge checkpoint directory (hf-vision + mlp +
    hf-causal-lm); returns it. `prompt_template` is how prompts are worded; by default as the
    directory's processor chat template words one image and one text, else LLaVA-1.5's."""
    from vlbridge.interop.llava_prompt import chat_prompt_template, processor_chat_template
    from vlbridge.plugins.llms.loading import load_tokenizer

    src, out = Path(src_dir).expanduser(), Path(out_dir)
    config = read_llava_config(src)
    selection = _import_selection(config, src / "config.json")  # refuses what hf-vision cannot select, before any weight loads
    tokenizer = load_tokenizer("hf-llava", str(src), pad_from_eos=True)  # as hf-causal-lm reads it: padding is always masked
    image_token = _image_token(tokenizer, config.get("image_token_index", 32000))
    processor = _processor_settings(src)  # a file that is not a JSON object is refused before anything is written
    chat = processor_chat_template(src)
    if chat is not None:  # the LLM's tokenizer keeps it, whichever file held it, for the export's processor
        tokenizer.chat_template = chat
    if prompt_template is None:
        prompt_template = LLAVA_15_TEMPLATE if chat is None else chat_prompt_template(chat, tokenizer, image_token, src)
    elif "<image>" not in prompt_template and image_token not in prompt_template:  # visual tokens would go before BOS
        raise VLBridgeError(f"prompt_template {prompt_template!r} has no '<image>': LLaVA reads its visual tokens where the "
                            "prompt holds its image token, so say where they go (e.g. 'USER: <image>\\n{} ASSISTANT:')")
    stop = stop_token_option(checkpoint_eos(src, config["text_config"]), tokenizer, tokenizer.eos_token_id, src / "config.json")
    hf = _load_llava(src)
    out.mkdir(parents=True, exist_ok=True)
    vision_dir, llm_dir = out / "vision", out / "llm"
    hf.model.vision_tower.save_pretrained(str(vision_dir))
    for file, settings in processor.items():  # as transformers writes them (to_json_string)
        atomic_write_text(vision_dir / file, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    _causal_lm(hf.config.text_config, hf.model.language_model, hf.lm_head).save_pretrained(str(llm_dir))
    carry_generation_config(src, llm_dir)  # LLaVA's generate stops at its generation_config.json's ids (a list, often)
    tokenizer.save_pretrained(str(llm_dir))
    projector = hf.model.multi_modal_projector
    tensors = {"layers.0.weight": projector.linear_1.weight, "layers.2.weight": projector.linear_2.weight}
    for index, linear in (("0", projector.linear_1), ("2", projector.linear_2)):  # no bias in the file: zeros are exact
        tensors[f"layers.{index}.bias"] = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
    tensors = {key: value.float() for key, value in tensors.items()}
    assembly = {
        "name": name or src.name,
        "description": f"imported from transformers LlavaForConditionalGeneration at {src}",
        "encoder": {"use": "hf-vision", "options": {"model": str(vision_dir.resolve()), "layer": config.get("vision_feature_layer", -2),
                                                    **selection}},
        "connector": {"use": "mlp", "options": {"depth": 2, "activation": "gelu"}},
        "llm": {"use": "hf-causal-lm", "options": {"model": str(llm_dir.resolve()), "prompt_template": prompt_template.replace("<image>", image_token),
                                                   "image_token": image_token, **stop}},
    }
    check_imported_assembly(assembly, src, "transformers LlavaForConditionalGeneration")
    return write_checkpoint(out, assembly, tensors, 2, {"source": "transformers LlavaForConditionalGeneration"})


def export_hf_llava(model: Any, out_dir: str | Path, allow_approximate: bool = False) -> Path:
    """Write a built hf-vision + mlp (depth 2, GELU) + hf-causal-lm model as a transformers
    LlavaForConditionalGeneration directory (weights, config, and the LlavaProcessor: tokenizer with
    its image token, image processor, a chat template that words prompts as vlbridge does). A model
    LLaVA cannot hold exactly is refused unless `allow_approximate` (vlbridge.interop.export_fidelity)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from vlbridge.interop.llava_prompt import export_chat_template

    plan = model.plan
    connector = model.assembly.connector.options
    require_stage2(model, "transformers' LLaVA")
    if (plan.encoder.name, plan.connector.name) != ("hf-vision", "mlp") or model.llm is None or plan.llm.name != "hf-causal-lm":
        raise VLBridgeError("only hf-vision + mlp + hf-causal-lm models (built for stage 2) map onto transformers' LLaVA; this one is "
                            f"{plan.encoder.name} + {plan.connector.name} + {plan.llm.name if plan.llm else 'no LLM'}")
    if connector.depth != 2 or connector.activation != "gelu":
        raise VLBridgeError(f"LLaVA's projector is Linear, GELU, Linear (mlp depth 2, gelu); this mlp has depth {connector.depth} "
                            f"and activation {connector.activation!r}")
    llm, encoder_opts = model.llm, model.assembly.encoder.options
    vocab = llm.model.config.vocab_size
    if llm.image_token_id is None or llm.image_token_id >= vocab:
        raise VLBridgeError(f"LLaVA embeds its image token: the LLM's image token id {llm.image_token_id} must lie inside its "
                            f"vocabulary of {vocab}; resize the LLM's embeddings or pick an image_token the vocabulary holds")
    if not prompt_places_visual_tokens(llm):  # vlbridge puts them first, before BOS, where LLaVA cannot
        raise VLBridgeError(f"LLaVA reads its visual tokens where the prompt holds its image token; this model's prompt "
                            f"({llm.format_prompt('{}')!r}) has none, so vlbridge puts them before the whole text, which "
                            "LLaVA cannot; give the LLM a prompt_template holding the image token, e.g. 'USER: <image>\\n{} ASSISTANT:'")
    tower = model.encoder.tower  # hf-vision: the transformers vision model
    layers = model.connector.layers
    # A projector imported without biases holds zeros: written back without them, as it came (exact either way).
    projector_bias = any(bool(layers[i].bias.detach().any()) for i in (0, 2))
    strategy, prefix = _export_strategy(encoder_opts)
    merged = model.merged_llm_model()  # LoRA merged (its config says whether the merge untied the head)
    config = LlavaConfig(vision_config=tower.config.to_dict(), text_config=export_text_config(llm, merged.config),
                         image_token_index=llm.image_token_id, vision_feature_layer=_llava_feature_layer(encoder_opts),
                         vision_feature_select_strategy=strategy,
                         projector_hidden_act="gelu", image_seq_length=plan.encoder_out.num_tokens,
                         multimodal_projector_bias=projector_bias, tie_word_embeddings=merged.config.tie_word_embeddings)
    _require_llava_layout(merged)
    head = dict(merged.lm_head.state_dict())
    head_bias = head.pop("bias", None)  # LLaVA's lm_head has no bias: one of zeros is left out exactly
    differences = llava_differences(model.assembly, llm.model.config)
    if head_bias is not None and bool(head_bias.detach().any()):
        differences.append("the language model's lm_head bias is dropped, because LLaVA's lm_head has none; "
                           "an LLM whose head has no bias (or a zero one) exports exactly")
    with torch.device("meta") if not differences else contextlib.nullcontext():  # a probe needs real buffers (rotary, positions)
        hf = LlavaForConditionalGeneration(config)
    hf.model.vision_tower.load_state_dict(_full_tower_state(tower, encoder_opts), strict=True, assign=True)
    projector = {"linear_1.weight": layers[0].weight, "linear_2.weight": layers[2].weight}
    if projector_bias:
        projector.update({"linear_1.bias": layers[0].bias, "linear_2.bias": layers[2].bias})
    hf.model.multi_modal_projector.load_state_dict(projector, strict=True, assign=True)
    hf.model.language_model.load_state_dict(merged.model.state_dict(), strict=True, assign=True)
    hf.lm_head.load_state_dict(head, strict=True, assign=True)
    hf.tie_weights()
    hf.eval()
    settle("transformers' LLaVA", differences, lambda: _probe_difference(model, hf), allow_approximate)
    processor = LlavaProcessor(llava_image_processor(plan.preprocess), llm.tokenizer, patch_size=tower.config.patch_size,
                               vision_feature_select_strategy=strategy, image_token=model.assembly.llm.options.image_token,
                               num_additional_image_tokens=prefix,  # the tower's tokens before its patches
                               chat_template=export_chat_template(llm))  # apply_chat_template words prompts as vlbridge
    return write_export(out_dir, hf, processor)


def _llava_feature_layer(opts: Any) -> int:
    """The hf-vision `layer` as LLaVA's vision_feature_layer. Layer 0 (the embedding output) goes out
    as its negative twin, -(blocks + 1): transformers asks the tower for hidden states only when the
    index is truthy, so a LLaVA saved with 0 fails on its first forward."""
    layer = opts.layer
    return layer if layer != 0 else -(opts.tower.layers + 1)


def _require_llava_layout(causal: Any) -> None:
    """LLaVA holds the language model's body as `model.language_model` and ties its lm_head to that
    body's `embed_tokens` (Llama's layout); a model keeping them elsewhere (GPT-2's `transformer`,
    OPT's `decoder.embed_tokens`) makes transformers fail while building the LLaVA."""
    body = getattr(causal, "model", None)
    kind = causal.config.model_type
    if body is None:
        raise VLBridgeError(f"transformers' LLaVA cannot hold a {kind!r} language model: {type(causal).__name__} keeps its body "
                            f"in {causal.base_model_prefix!r}, not 'model'")
    if causal.config.tie_word_embeddings and not isinstance(getattr(body, "embed_tokens", None), torch.nn.Module):
        raise VLBridgeError(f"transformers' LLaVA cannot hold a {kind!r} language model with tied embeddings: it ties lm_head to "
                            f"model.embed_tokens, which {type(body).__name__} does not have")


def llava_differences(assembly: Any, llm_config: Any = None) -> list[str]:
    """What transformers' LLaVA would change in an hf-vision + mlp + hf-causal-lm assembly (and, given
    the language model's config, in its logits: LLaVA applies its own lm_head and nothing after it)."""
    found = []
    if assembly.encoder.options.final_norm:
        found.append("the hf-vision encoder's final_norm is dropped, because LLaVA feeds the projector the chosen hidden state "
                     "without the tower's final norm; build with final_norm: false (and retrain the projector) to export exactly")
    for name, value in head_settings(llm_config).items():
        found.append(f"the language model's {name} ({value!r}) is not applied, because LLaVA computes its logits with the "
                     f"bare lm_head; an LLM with {name} {LM_HEAD_ONLY[name]!r} exports exactly")
    return found


# Settings a transformers *ForCausalLM applies to its logits after lm_head (Gemma-2/3's soft cap, Cohere's
# and Granite's scales), with the value that leaves them as they are. LlavaForConditionalGeneration
# runs the language model's body and its own lm_head, so none of them applies inside LLaVA.
LM_HEAD_ONLY: dict[str, Any] = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def head_settings(config: Any) -> dict[str, Any]:
    """The LM_HEAD_ONLY settings of a text config (object or dict) that change its logits."""
    if config is None:
        return {}
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    return {name: get(name) for name, neutral in LM_HEAD_ONLY.items() if get(name, neutral) != neutral}


def _export_strategy(opts: Any) -> tuple[str, int]:
    """(LLaVA's vision_feature_select_strategy, the tower's tokens before its patches) for what the
    hf-vision encoder keeps: LLaVA keeps every token ("full") or all but the first ("default")."""
    from vlbridge.plugins.encoders.hf_vision import kept_prefix

    facts = opts.tower
    if opts.resolved_image_size != facts.image_size:
        raise VLBridgeError(f"the hf-vision encoder runs at {opts.resolved_image_size} px with position embeddings interpolated from "
                            f"its tower's {facts.image_size}; LLaVA runs the tower at its config's size, so build with "
                            f"image_size {facts.image_size} (or unset) to export")
    cls, registers = kept_prefix(opts)
    prefix = facts.cls_tokens + facts.registers
    if cls + registers == prefix:
        return "full", prefix
    if facts.cls_tokens == 1 and cls == 0 and registers == facts.registers:
        return "default", prefix
    raise VLBridgeError(f"the hf-vision encoder keeps {cls} of its tower's {facts.cls_tokens} class tokens and {registers} of its "
                        f"{facts.registers} register tokens; LLaVA keeps every token of the hidden state or all but the first, so set "
                        "include_cls and include_registers to keep all of them, or all but a single leading [CLS], to export")


def _probe_difference(model: Any, hf: Any) -> float:
    """Max abs difference of the logits of `model` and its LLaVA export `hf` on one probe image and
    prompt (vlbridge's placeholder expanded to image_seq_length image tokens, as LlavaProcessor does)."""
    pixels, llm = probe_pixels(model), model.llm
    ids, mask = llm.tokenize([llm.format_prompt(PROBE_PROMPT)])
    row = ids[0][mask[0].bool()].tolist()
    slot = row.index(llm.image_token_id)
    expanded = torch.tensor([row[:slot] + [llm.image_token_id] * hf.config.image_seq_length + row[slot + 1:]])
    ours = eval_logits(model, pixels.to(model.device), ids.to(model.device), mask.to(model.device))
    theirs = hf(input_ids=expanded, pixel_values=pixels, attention_mask=torch.ones_like(expanded)).logits
    return max_logit_difference(ours, theirs)


def _full_tower_state(tower: torch.nn.Module, opts: Any) -> dict[str, torch.Tensor]:
    """The vision model's whole state. hf-vision drops what it never runs (the blocks after `layer`,
    SigLIP's pooling head, ViT's pooler), so never trains; LLaVA stores them, so whatever the live
    tower lacks is read back from the encoder's own directory."""
    live = tower.state_dict()
    with torch.device("meta"):
        whole = set(type(tower)(tower.config).state_dict())
    lacking = sorted(whole - set(live))
    if not lacking:
        return live
    if not opts.model:
        raise VLBridgeError(f"the hf-vision encoder dropped {len(lacking)} tensors of its tower it never runs ({lacking[0]}, ...) and "
                            "has no `model` directory to read them from; build it with keep_all_layers: true to export")
    full = type(tower).from_pretrained(str(Path(opts.model).expanduser()), local_files_only=True, dtype=next(tower.parameters()).dtype)
    return {**full.state_dict(), **live}  # the live tensors win: a fine-tuned block is exported as trained
