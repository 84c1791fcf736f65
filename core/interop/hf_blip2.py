"""Import from, and export to, transformers' BLIP-2 format (`save_pretrained` directories such as a
local copy of Salesforce/blip2-opt-2.7b, blip2-flan-t5-xl or blip2-itm-vit-g).

Import writes a self-contained vlbridge checkpoint: the encoder's weights (ours, safetensors), the
LLM as its own transformers directory (with the tokenizer), the Q-Former as the connector's
weights, and the assembly YAML that binds them. `vlbridge.load(out_dir)` then gives the same
outputs as transformers' model.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vlbridge.files.atomic import atomic_write, atomic_write_text
from vlbridge.files.checkpoint import write_checkpoint
from vlbridge.errors import VLBridgeError, WeightsError
from vlbridge.interop.import_checks import check_imported_assembly
from vlbridge.interop.stop_token import carry_generation_config, checkpoint_eos, plugin_end_id, stop_token_option
from vlbridge.interop.image_processor_check import check_image_processor
from vlbridge.interop.export_state import load_export_state, require_present, require_stage2
from vlbridge.interop.hf_blip2_config import blip2_config, blip2_differences
from vlbridge.interop.export_fidelity import (
    PROBE_PROMPT, eval_logits, exported_prompt_options, max_logit_difference, probe_pixels, prompt_wording,
    settle, warn_left_out,
)
from vlbridge.files.hf_config import load_failure, transformers_config
from vlbridge.interop.hf_processor import blip_image_processor, write_export
from vlbridge.files.weights import read_hf_directory
from vlbridge.plugin.specs import Preprocess

GENERATION = "Blip2ForConditionalGeneration"
RETRIEVAL = "Blip2ForImageTextRetrieval"
LLM_PLUGINS = {"opt": "opt", "t5": "flan-t5"}
EXPORTABLE_LLMS = (*LLM_PLUGINS.values(), "hf-causal-lm", "hf-seq2seq")  # transformers models BLIP-2's language_model can hold


IMPORTED_AS = {GENERATION: GENERATION, "Blip2Model": GENERATION, RETRIEVAL: RETRIEVAL}  # config's class -> what it imports as
NEEDED = {GENERATION: ("vision_model.", "query_tokens", "qformer.", "language_projection.", "language_model."),
          RETRIEVAL: ("vision_model.", "query_tokens", "qformer.", "embeddings.", "vision_projection.", "text_projection.", "itm_head.")}


def _architecture(config: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    """GENERATION or RETRIEVAL: what the directory holds, named by its config or told by its tensors;
    a BLIP-2 class that holds only part of the model (the vision tower, the Q-Former, one tower with
    its projection) is refused by name, as is a file missing a part the import needs."""
    named = (config.get("architectures") or [None])[0]
    if named is not None and named not in IMPORTED_AS:
        raise VLBridgeError(f"the directory holds a transformers {named}, which is not a whole BLIP-2; vlbridge imports "
                            f"{GENERATION} (or Blip2Model) as a captioning model and {RETRIEVAL} as a stage-1 one")
    architecture = IMPORTED_AS.get(named) or (GENERATION if any(k.startswith("language_model.") for k in state) else RETRIEVAL)
    missing = [prefix for prefix in NEEDED[architecture] if not any(k.startswith(prefix) for k in state)]
    if missing:
        raise VLBridgeError(f"the directory's weights have no {', '.join(repr(m) for m in missing)} tensors, which a "
                            f"{architecture} holds; give the directory its save_pretrained wrote whole")
    return architecture


def unsupported_settings(config: dict[str, Any], family: str) -> None:
    """Refuse a BLIP-2 / InstructBLIP config that the eva-vit-g + qformer + LLM assembly would load
    without error but compute differently: a silently wrong model is worse than a refusal."""
    vision, qformer, text = (config.get(key) or {} for key in ("vision_config", "qformer_config", "text_config"))
    problems = []
    for where, part, reads in (("vision_config", vision, "eva-vit-g's MLPs"), ("qformer_config", qformer, "the qformer's FFNs")):
        act = part.get("hidden_act", "gelu")
        if act != "gelu":
            problems.append(f"{where}.hidden_act is {act!r}, but {reads} use exact GELU ('gelu')")
    size, patch = vision.get("image_size", 224), vision.get("patch_size", 14)
    if size % patch:
        problems.append(f"vision_config.image_size {size} is not a multiple of its patch_size {patch}: transformers' patch "
                        f"embedding drops the {size % patch}-pixel margin, and eva-vit-g takes whole patches only")
    if text.get("model_type") == "opt" and text.get("word_embed_proj_dim", text.get("hidden_size")) != text.get("hidden_size"):
        problems.append(f"text_config.word_embed_proj_dim {text['word_embed_proj_dim']} differs from its hidden_size "
                        f"{text['hidden_size']}: the OPT projects its input embeddings (project_in), which transformers' {family} "
                        "bypasses for the visual tokens, so no assembly can reproduce it")
    if problems:
        raise VLBridgeError(f"cannot import this {family} checkpoint exactly: " + "; ".join(problems))


def zero_qv_biases(vision: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A vision tower saved with qkv_bias=False gets eva-vit-g's q/v biases as zeros (the same attention)."""
    from vlbridge.plugins.encoders.eva_vit_g_convert import with_zero_qv_biases

    return state if vision.get("qkv_bias", True) else with_zero_qv_biases(state)


IMPORTED_ENCODER_FILE = "encoder.safetensors"  # the eva-vit-g weights an import writes into its checkpoint folder


def write_encoder(out: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A converted vision tower, written atomically as the checkpoint's encoder file (eva-vit-g's
    `pretrained`); returns its path."""
    path = out / IMPORTED_ENCODER_FILE
    contiguous = {key: value.contiguous() for key, value in tensors.items()}
    atomic_write(path, lambda tmp: save_file(contiguous, str(tmp)))
    return path


def encoder_options(vision: dict[str, Any], pretrained: str) -> dict[str, Any]:
    """eva-vit-g options reproducing a transformers Blip2VisionConfig exactly (all layers kept)."""
    layers = vision.get("num_hidden_layers", 39)
    return {
        "variant": "g", "width": vision.get("hidden_size", 1408), "depth": layers, "num_blocks": layers,
        "heads": vision.get("num_attention_heads", 16), "mlp_hidden": vision.get("intermediate_size", 6144),
        "patch_size": vision.get("patch_size", 14), "image_size": vision.get("image_size", 224),
        "layer_norm_eps": vision.get("layer_norm_eps", 1e-6), "pretrained": pretrained,
    }


def blip2_preprocess(vision: dict[str, Any]) -> Preprocess:
    """eva-vit-g's eval transform for a transformers Blip2VisionConfig, as the import builds it."""
    from vlbridge.plugins.encoders import eva_vit_g

    return eva_vit_g.preprocess(eva_vit_g.EvaVitGOptions(**{**encoder_options(vision, ""), "pretrained": None}))


def connector_options(config: dict[str, Any], tokenizer: str | None) -> dict[str, Any]:
    """qformer options reproducing a transformers Blip2QFormerConfig (+ ln_vision = post_layernorm)."""
    qf, vision = config.get("qformer_config", {}), config.get("vision_config", {})
    options = {
        "variant": "base", "num_query_tokens": config.get("num_query_tokens", 32),
        "hidden_size": qf.get("hidden_size", 768), "num_layers": qf.get("num_hidden_layers", 12),
        "num_heads": qf.get("num_attention_heads", 12), "intermediate_size": qf.get("intermediate_size", 3072),
        "cross_attention_freq": qf.get("cross_attention_frequency", 2), "vocab_size": qf.get("vocab_size", 30522),
        "max_text_positions": qf.get("max_position_embeddings", 512), "embed_dim": config.get("image_text_hidden_size", 256),
        "layer_norm_eps": qf.get("layer_norm_eps", 1e-12), "ln_vision_eps": vision.get("layer_norm_eps", 1e-6),
        "encoder_width": vision.get("hidden_size", 1408),
    }
    if tokenizer is not None:
        options["tokenizer"] = tokenizer
    return options


def _llm_plugin(text: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(plugin, transformers class name, extra options) for a BLIP-2-style model's language model:
    opt / flan-t5 where they fit, else the generic plugins with the visual prompt always first. A type
    with a causal LM class is one, as transformers builds it (`use_decoder_only_language_model`):
    BART's language model in a BLIP-2 is its decoder alone."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    model_type = text.get("model_type")
    seq2seq = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if model_type in LLM_PLUGINS:
        return LLM_PLUGINS[model_type], seq2seq if model_type == "t5" else causal, {}
    if causal or seq2seq:
        return ("hf-causal-lm" if causal else "hf-seq2seq"), causal or seq2seq, {"image_token": None}
    raise VLBridgeError(f"a {model_type!r} language model is neither a transformers causal nor seq2seq LM; vlbridge cannot load it")


def llm_plan(src: Path, config: dict[str, Any]) -> tuple[str, str, dict[str, Any], Any]:
    """(plugin, transformers class name, options, tokenizer) of the language model. The tokenizer is read
    and the token generation stops at settled here, so a checkpoint either is refused before anything
    is written or imports stopping where transformers' model stops; an export of ours also gets back
    the prompt wording it kept in PROMPT_FILE."""
    text = config.get("text_config") or {}
    plugin, architecture, options = _llm_plugin(text)
    tokenizer = _read_tokenizer(src, "the language model")
    wording = exported_prompt_options(src, tokenizer)  # an export of ours keeps there what its processor cannot hold
    if wording:  # only the generic plugins word prompts (as the exported model's LLM, one of them, did)
        plugin, options = ("hf-seq2seq" if plugin in ("flan-t5", "hf-seq2seq") else "hf-causal-lm"), {"image_token": None, **wording}
    if plugin in ("opt", "hf-causal-lm"):  # the plugin's own end token ('\n', the tokenizer's eos) may not be the checkpoint's
        options = {**options, **stop_token_option(checkpoint_eos(src, text), tokenizer, plugin_end_id(plugin, tokenizer),
                                                  src / "config.json", several=plugin != "opt")}
    return plugin, architecture, options, tokenizer


def _write_llm(config: dict[str, Any], state: dict[str, torch.Tensor], out: Path, plan: tuple[str, str, dict[str, Any], Any],
               src: Path) -> dict[str, Any]:
    """The language model (as `llm_plan` settled it) as a plain transformers directory our LLM plugins
    load with from_pretrained, with `src`'s generation settings (the ids transformers' model stops at)."""
    plugin, architecture, options, tokenizer = plan
    text = {**(config.get("text_config") or {}), "architectures": [architecture]}
    llm_dir = out / "llm"
    llm_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k.removeprefix("language_model."): v.contiguous() for k, v in state.items() if k.startswith("language_model.")}
    atomic_write(llm_dir / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(llm_dir / "config.json", json.dumps(text, indent=2))
    carry_generation_config(src, llm_dir)
    tokenizer.save_pretrained(str(llm_dir))
    return {"use": plugin, "options": {"model": str(llm_dir.resolve()), **options}}


def _read_tokenizer(src: Path, what: str) -> Any:
    """The tokenizer of `src`, refused by name where missing or empty."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src), trust_remote_code=False)
    except Exception as exc:  # transformers and tokenizers raise many types for a missing or broken file
        raise load_failure(f"the tokenizer for {what}", src, exc, "save the processor or tokenizer into it") from exc
    if not tokenizer("a photo").input_ids:  # transformers builds an empty tokenizer from config.json alone
        raise WeightsError(f"{src} holds no usable tokenizer for {what} (no vocabulary file: tokenizer.json, vocab.json, "
                           "spiece.model ...); save the processor or tokenizer into it (processor.save_pretrained(<dir>))")
    return tokenizer


def _copy_tokenizer(src: Path, dst: Path, what: str) -> None:
    """The tokenizer of `src` re-saved into `dst` (refused by name where missing or empty)."""
    _read_tokenizer(src, what).save_pretrained(str(dst))


def import_hf_blip2(src_dir: str | Path, out_dir: str | Path, name: str | None = None) -> Path:
    """Convert a transformers BLIP-2 directory into a vlbridge checkpoint directory; returns it."""
    from vlbridge.plugins.connectors.qformer_convert import from_transformers
    from vlbridge.plugins.encoders.eva_vit_g_convert import convert_hf_blip2_vision_state_dict

    src, out = Path(src_dir), Path(out_dir)
    if not src.is_dir():
        raise WeightsError(f"not a directory: {src}")
    config = transformers_config(src, "blip-2", "Blip2ForConditionalGeneration")
    unsupported_settings(config, "BLIP-2")
    check_image_processor(src, blip2_preprocess(config.get("vision_config") or {}), "BLIP-2")
    state = read_hf_directory(src)
    architecture = _architecture(config, state)
    llm = llm_plan(src, config) if architecture == GENERATION else None  # refused here, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    encoder_file = write_encoder(out, zero_qv_biases(config.get("vision_config") or {}, convert_hf_blip2_vision_state_dict(
        {k: v for k, v in state.items() if k.startswith("vision_model.")})))
    assembly: dict[str, Any] = {"name": name or src.name, "description": f"imported from transformers {architecture} at {src}",
                                "encoder": {"use": "eva-vit-g", "options": encoder_options(config.get("vision_config", {}), str(encoder_file.resolve()))}}
    connector = from_transformers(state)
    if architecture == RETRIEVAL:
        tokenizer_dir = out / "qformer-tokenizer"
        _copy_tokenizer(src, tokenizer_dir, "the Q-Former (a BERT tokenizer)")
        assembly["connector"] = {"use": "qformer", "options": connector_options(config, str(tokenizer_dir.resolve()))}
        stage, allow_missing = 1, ["lm_head.*", "temp"]  # transformers keeps no ITG head and no temperature
    else:
        assembly["connector"] = {"use": "qformer", "options": connector_options(config, None)}
        assembly["llm"] = _write_llm(config, state, out, llm, src)
        stage, allow_missing = 2, []
    check_imported_assembly(assembly, src, f"transformers {architecture}")
    return write_checkpoint(out, assembly, connector, stage, {"source": f"transformers {architecture}", "allow_missing": allow_missing})


# -- export ---------------------------------------------------------------------------------------
_TEXT_SIDE_HF = re.compile(r"^(embeddings\.|vision_projection\.|text_projection\.|itm_head\.|qformer\.encoder\.layer\.\d+\.(intermediate|output)\.)")


def require_buildable_language_model(model, family: str) -> None:
    """transformers' BLIP-2 and InstructBLIP build their language model as a causal LM whenever its type
    has one: an encoder-decoder of such a type (BART, mBART, Pegasus) would come back as its decoder alone."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = model.llm.model.config
    if config.is_encoder_decoder and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise VLBridgeError(f"transformers' {family} builds a {config.model_type!r} language model as "
                            f"{MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]} (its decoder alone), so this encoder-decoder "
                            "cannot be exported to it")


def tokenizer_with_image_token(model) -> tuple[Any, int]:
    """A copy of the LLM's tokenizer with an `<image>` token (the live model's stays as it is) and its
    id, which must lie inside the LLM's vocabulary: transformers' BLIP-2 family embeds it."""
    tokenizer = copy.deepcopy(model.llm.tokenizer)
    vocab = model.llm.model.config.vocab_size
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    index = tokenizer.convert_tokens_to_ids("<image>")
    if index >= vocab:
        raise VLBridgeError(f"no free id for the <image> token: the tokenizer has {len(tokenizer)} tokens and the LLM's vocabulary {vocab}")
    return tokenizer, index


def export_hf_blip2(model, out_dir: str | Path, allow_approximate: bool = False) -> Path:
    """Write a built eva-vit-g + qformer + transformers-LLM model as a transformers
    Blip2ForConditionalGeneration directory (weights, config, and the Blip2Processor: tokenizer with
    an `<image>` token, image processor; the prompt wording, which it has no place for, in
    `vlbridge_prompt.json` where there is one). A model transformers cannot hold exactly is refused unless
    `allow_approximate` (vlbridge.interop.export_fidelity)."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from vlbridge.plugins.connectors.qformer_convert import to_transformers
    from vlbridge.plugins.encoders.eva_vit_g_convert import to_hf_blip2_vision_state_dict

    plan = model.plan
    if model.assembly.llm is None:  # a retrieval model (what a Blip2ForImageTextRetrieval imports as)
        from vlbridge.interop.hf_blip2_retrieval import export_hf_blip2_retrieval

        return export_hf_blip2_retrieval(model, out_dir, allow_approximate)
    require_stage2(model, "transformers' BLIP-2")
    if (plan.encoder.name, plan.connector.name) != ("eva-vit-g", "qformer") or model.llm is None or plan.llm.name not in EXPORTABLE_LLMS:
        raise VLBridgeError("only eva-vit-g + qformer + a transformers LLM (opt, flan-t5, hf-causal-lm, hf-seq2seq; built for stage 2) "
                            "map onto transformers' BLIP-2; "
                            f"this one is {plan.encoder.name} + {plan.connector.name} + {plan.llm.name if plan.llm else 'no LLM'}")
    if getattr(model.connector, "instruction_aware", False):  # BLIP-2's queries read no instruction: other visual tokens
        raise VLBridgeError("this Q-Former is instruction-aware (InstructBLIP): transformers' BLIP-2 would compute its queries "
                            "without the instruction, so the export would give other outputs; export it with "
                            "`vlbridge export hf-instructblip` (vlbridge.export_hf_instructblip)")
    require_buildable_language_model(model, "BLIP-2")
    tokenizer, image_token_index = tokenizer_with_image_token(model)
    state = to_hf_blip2_vision_state_dict(model.encoder.state_dict())
    require_present(model.connector, lambda ours: any(not _TEXT_SIDE_HF.match(k) for k in to_transformers({ours: None})),
                    "the transformers BLIP-2 export")
    state.update({k: v for k, v in to_transformers(model.connector.state_dict()).items() if not _TEXT_SIDE_HF.match(k)})
    warn_left_out(model.connector, "transformers BLIP-2", text_side=True)
    llm_model = model.merged_llm_model()  # LoRA merged
    state.update({f"language_model.{k}": v for k, v in llm_model.state_dict().items()})
    hf = Blip2ForConditionalGeneration(blip2_config(model, image_token_index)).eval()
    load_export_state(hf, state, llm_model, "Blip2ForConditionalGeneration")
    settle("transformers' BLIP-2", blip2_differences(model.assembly, model.llm), lambda: probe_difference(model, hf, image_token_index), allow_approximate)
    processor = Blip2Processor(blip_image_processor(model.plan.preprocess), tokenizer,
                               num_query_tokens=model.assembly.connector.options.num_query_tokens)
    return write_export(out_dir, hf, processor, prompt_wording(model, "transformers BLIP-2"))


def probe_difference(model, hf, image_token_index: int) -> float:
    """Max abs difference of the logits of `model` and its transformers export `hf` (BLIP-2 or
    InstructBLIP) on one probe image and prompt; the prompt is also the instruction where one is read."""
    pixels, tokenizer = probe_pixels(model), model.llm.tokenizer
    text = tokenizer([PROBE_PROMPT], return_tensors="pt")
    queries = model.assembly.connector.options.num_query_tokens
    ids = torch.cat([torch.full((1, queries), image_token_index), text.input_ids], 1)
    mask = torch.cat([torch.ones(1, queries, dtype=text.attention_mask.dtype), text.attention_mask], 1)
    labels = {"labels": text.input_ids} if model.llm.is_encoder_decoder else {}
    ours_extra, hf_extra = dict(labels), dict(labels)
    if getattr(model.connector, "instruction_aware", False):
        instruction = model.connector.tokenizer([PROBE_PROMPT], return_tensors="pt")
        ours_extra["instructions"] = [PROBE_PROMPT]
        hf_extra.update(qformer_input_ids=instruction.input_ids, qformer_attention_mask=instruction.attention_mask)
    device = model.device
    ours = eval_logits(model, pixels.to(device), text.input_ids.to(device), text.attention_mask.to(device),
                       **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in ours_extra.items()})
    return max_logit_difference(ours, hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, **hf_extra).logits)
