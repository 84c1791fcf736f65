"""Import from, and export to, transformers' LLaVA format (`LlavaForConditionalGeneration`
save_pretrained directories such as a local copy of llava-hf/llava-1.5-7b-hf).

LLaVA is an assembly vlbridge already has the parts for: its vision tower becomes an `hf-vision`
encoder (the layer `vision_feature_layer`, [CLS] dropped for the "default" select strategy), its
`multi_modal_projector` (linear_1, act, linear_2) the `mlp` connector, its language model an
`hf-causal-lm` whose prompt holds the `<image>` placeholder where the visual tokens go. Import
writes the tower and the language model as their own transformers directories, the projector as
the connector's weights and the assembly that binds them; `vlbridge.load(out)` then gives
transformers' logits and generations. Export goes back from such a model.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

import torch

from vlbridge.files.checkpoint import write_checkpoint
from vlbridge.errors import VLBridgeError
from vlbridge.interop.export_fidelity import PROBE_PROMPT, eval_logits, max_logit_difference, probe_pixels, settle
from vlbridge.files.hf_config import load_failure, transformers_config
from vlbridge.interop.hf_processor import clip_image_processor, save_processor

LLAVA_15_TEMPLATE = "USER: <image>\n{} ASSISTANT:"  # LLaVA-1.5's conversation format (llava-hf's chat template renders it)
SELECT_STRATEGIES = {"default": False, "full": True}  # -> include_cls
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_FIX = "give a directory written by LlavaForConditionalGeneration.save_pretrained (config.json, weights, tokenizer)"


def read_llava_config(src: Path) -> dict[str, Any]:
    config = transformers_config(src, "llava", "LlavaForConditionalGeneration")
    path = src / "config.json"
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise VLBridgeError(f"{path}: vision_feature_layer {layer!r} concatenates several layers; vlbridge's hf-vision encoder "
                            "takes one layer, so this LLaVA variant cannot be imported exactly")
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy not in SELECT_STRATEGIES:
        raise VLBridgeError(f"{path}: vision_feature_select_strategy {strategy!r} is unknown; expected one of {sorted(SELECT_STRATEGIES)}")
    act = config.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise VLBridgeError(f"{path}: projector_hidden_act {act!r}; vlbridge's mlp connector uses GELU (LLaVA-1.5's mlp2x_gelu)")
    return config


def _load_llava(src: Path) -> Any:
    from transformers import LlavaForConditionalGeneration

    try:
        return LlavaForConditionalGeneration.from_pretrained(str(src), dtype="auto", local_files_only=True)
    except Exception as exc:  # transformers raises many types for a broken file
        raise load_failure("LlavaForConditionalGeneration weights", src, exc, _FIX) from exc


def _causal_lm(text_config: Any, language_model: torch.nn.Module, lm_head: torch.nn.Module) -> Any:
    """A standalone AutoModelForCausalLM holding LLaVA's language model and head (shared tensors, no copy)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        causal = AutoModelForCausalLM.from_config(text_config)
    state = {f"model.{k}": v for k, v in language_model.state_dict().items()}
    state.update({f"lm_head.{k}": v for k, v in lm_head.state_dict().items()})
    causal.load_state_dict(state, strict=True, assign=True)
    causal.tie_weights()
    return causal


def _image_token(tokenizer: Any, index: int) -> str:
    token = tokenizer.convert_ids_to_tokens(index)
    if not isinstance(token, str) or tokenizer(token, add_special_tokens=False)["input_ids"] != [index]:
        raise VLBridgeError(f"the tokenizer has no single token for image_token_index {index}; save the LLaVA processor's "
                            "tokenizer (it carries '<image>') into the directory")
    return token


def import_hf_llava(src_dir: str | Path, out_dir: str | Path, name: str | None = None,
                    prompt_template: str = LLAVA_15_TEMPLATE) -> Path:
    """Convert a transformers LLaVA directory into a vlbridge checkpoint directory (hf-vision + mlp +
    hf-causal-lm); returns it. `prompt_template` is how prompts are worded (LLaVA-1.5's by default)."""
    from vlbridge.plugins.llms.loading import load_tokenizer

    src, out = Path(src_dir).expanduser(), Path(out_dir)
    config = read_llava_config(src)
    tokenizer = load_tokenizer("hf-llava", str(src))
    image_token = _image_token(tokenizer, config.get("image_token_index", 32000))
    hf = _load_llava(src)
    out.mkdir(parents=True, exist_ok=True)
    vision_dir, llm_dir = out / "vision", out / "llm"
    hf.model.vision_tower.save_pretrained(str(vision_dir))
    for file in PROCESSOR_FILES:
        if (src / file).is_file():
            shutil.copyfile(src / file, vision_dir / file)
    _causal_lm(hf.config.text_config, hf.model.language_model, hf.lm_head).save_pretrained(str(llm_dir))
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
                                                    "include_cls": SELECT_STRATEGIES[config.get("vision_feature_select_strategy", "default")]}},
        "connector": {"use": "mlp", "options": {"depth": 2, "activation": "gelu"}},
        "llm": {"use": "hf-causal-lm", "options": {"model": str(llm_dir.resolve()), "prompt_template": prompt_template.replace("<image>", image_token),
                                                   "image_token": image_token}},
    }
    return write_checkpoint(out, assembly, tensors, 2, {"source": "transformers LlavaForConditionalGeneration"})


def export_hf_llava(model: Any, out_dir: str | Path, allow_approximate: bool = False) -> Path:
    """Write a built hf-vision + mlp (depth 2, GELU) + hf-causal-lm model as a transformers
    LlavaForConditionalGeneration directory (weights, config, and the LlavaProcessor: tokenizer with
    its image token, image processor). A model LLaVA cannot hold exactly is refused unless
    `allow_approximate` (vlbridge.interop.export_fidelity)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    plan = model.plan
    connector = model.assembly.connector.options
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
    tower = model.encoder.tower  # hf-vision: the transformers vision model
    layer = encoder_opts.layer
    layers = model.connector.layers
    # A projector imported without biases holds zeros: written back without them, as it came (exact either way).
    projector_bias = any(bool(layers[i].bias.detach().any()) for i in (0, 2))
    config = LlavaConfig(vision_config=tower.config.to_dict(), text_config=llm.model.config.to_dict(),
                         image_token_index=llm.image_token_id, vision_feature_layer=layer,
                         vision_feature_select_strategy="full" if encoder_opts.include_cls else "default",
                         projector_hidden_act="gelu", image_seq_length=plan.encoder_out.num_tokens,
                         multimodal_projector_bias=projector_bias, tie_word_embeddings=llm.model.config.tie_word_embeddings)
    differences = llava_differences(model.assembly)
    with torch.device("meta") if not differences else contextlib.nullcontext():  # a probe needs real buffers (rotary, positions)
        hf = LlavaForConditionalGeneration(config)
    hf.model.vision_tower.load_state_dict(_full_tower_state(tower, encoder_opts), strict=True, assign=True)
    projector = {"linear_1.weight": layers[0].weight, "linear_2.weight": layers[2].weight}
    if projector_bias:
        projector.update({"linear_1.bias": layers[0].bias, "linear_2.bias": layers[2].bias})
    hf.model.multi_modal_projector.load_state_dict(projector, strict=True, assign=True)
    hf.model.language_model.load_state_dict((merged := model.merged_llm_model()).model.state_dict(), strict=True, assign=True)
    hf.lm_head.load_state_dict(merged.lm_head.state_dict(), strict=True, assign=True)  # LoRA merged into both
    hf.tie_weights()
    hf.eval()
    settle("transformers' LLaVA", differences, lambda: _probe_difference(model, hf), allow_approximate)
    out = Path(out_dir)
    hf.save_pretrained(str(out))
    patches = (plan.preprocess.image_size // tower.config.patch_size) ** 2
    default = not encoder_opts.include_cls  # the "default" strategy drops the first token
    processor = LlavaProcessor(clip_image_processor(plan.preprocess), llm.tokenizer, patch_size=tower.config.patch_size,
                               vision_feature_select_strategy="default" if default else "full",
                               image_token=model.assembly.llm.options.image_token,
                               num_additional_image_tokens=plan.encoder_out.num_tokens - patches + default)
    save_processor(processor, out)
    return out


def llava_differences(assembly: Any) -> list[str]:
    """What transformers' LLaVA would change in an hf-vision + mlp + hf-causal-lm assembly."""
    if assembly.encoder.options.final_norm:
        return ["the hf-vision encoder's final_norm is dropped, because LLaVA feeds the projector the chosen hidden state "
                "without the tower's final norm; build with final_norm: false (and retrain the projector) to export exactly"]
    return []


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
    """The vision model's whole state. hf-vision drops the layers after `layer` (never run, so never
    trained); LLaVA stores them, so they are read back from the encoder's own directory."""
    expected = getattr(tower.config, "num_hidden_layers", None)
    layers = getattr(getattr(tower, "vision_model", tower), "encoder", None)
    present = len(layers.layers) if layers is not None and hasattr(layers, "layers") else expected
    if present == expected:
        return tower.state_dict()
    if not opts.model:
        raise VLBridgeError(f"the hf-vision encoder runs {present} of its {expected} layers and has no `model` directory to read "
                            "the rest from; build it with keep_all_layers: true to export")
    full = type(tower).from_pretrained(str(Path(opts.model).expanduser()), local_files_only=True, dtype=next(tower.parameters()).dtype)
    return {**full.state_dict(), **tower.state_dict()}  # the live tensors win: a fine-tuned block is exported as trained
