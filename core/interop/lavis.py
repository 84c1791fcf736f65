"""Import a LAVIS BLIP-2 checkpoint (a `.pth` state dict such as blip2_pretrained.pth, or a stage-2
`Blip2OPT`/`Blip2T5` checkpoint) into a vlbridge checkpoint for an assembly you choose.

LAVIS saves only what trained: the Q-Former side (query tokens, `Qformer.*`, `ln_vision`, heads,
`opt_proj`/`t5_proj`), and the ViT where it was fine-tuned (COCO captioning and retrieval run with
`freeze_vit: False`); the frozen LLM, and a frozen ViT, come from the assembly. A ViT the file holds
is written into the checkpoint as the encoder's weights: the assembly's pretrained ViT is not the
one the checkpoint's Q-Former was trained on. An LLM the file holds (a whole-model dump) must be the
assembly's, tensor for tensor. The file is read with `weights_only=True`.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch

from vlbridge.assemblies.assembly import Assembly, load_assembly
from vlbridge.assemblies.saved import checkpoint_config
from vlbridge.errors import VLBridgeError, WeightsError
from vlbridge.files.checkpoint import WEIGHTS_FILE, read_connector_weights, write_checkpoint
from vlbridge.files.checkpoint_paths import ASSEMBLY_FILE, META_FILE
from vlbridge.interop.hf_blip2 import IMPORTED_ENCODER_FILE, write_encoder

STAGE1_MARKERS = ("Qformer.cls.", "vision_proj.", "text_proj.", "itm_head.")
STAGE2_MARKERS = ("opt_proj.", "t5_proj.")
VISION_PREFIX = "visual_encoder."  # LAVIS's ViT, saved when fine-tuned
LLM_PREFIXES = ("opt_model.", "t5_model.")  # the LLM, in a whole-model dump (or one that tuned it)
# Blip2OPT / Blip2T5 delete the Q-Former's text side for stage 2; InstructBLIP keeps it (without the stage-1 heads)
# to read the instruction.
INSTRUCTION_MARKER = "Qformer.bert.embeddings.word_embeddings."
# The ITG head's decoder, skipped as an alias (BERT ties it to the word embeddings, its bias to the head's).
TIED_DECODER = {"Qformer.cls.predictions.decoder.weight": "Qformer.bert.embeddings.word_embeddings.weight",
                "Qformer.cls.predictions.decoder.bias": "Qformer.cls.predictions.bias"}
BF16_ROUNDING = 2.0 ** -7  # a bf16 step, relative: how far bf16 and fp16 roundings of one weight may lie apart
FP16_SMALLEST = 2.0 ** -24  # fp16's subnormal step: tiny weights it rounds, bf16 keeps
UNSUPPORTED_PROJECTION = "llm_proj."  # LAVIS's Blip2VicunaInstruct
LAYER = re.compile(r"^Qformer\.bert\.encoder\.layer\.(\d+)\.")
CROSS_ATTENTION = re.compile(r"^Qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.")  # layers that read the image
PROJECTION_INTO = {"opt_proj.": ("Blip2OPT", False), "t5_proj.": ("Blip2T5", True)}  # -> (LAVIS model, LLM is encoder-decoder)


def lavis_stage(keys: list[str]) -> int:
    """Stage 1 checkpoints carry the ITC/ITM/ITG heads; stage-2 ones the LLM projection."""
    if any(k.startswith(STAGE2_MARKERS) for k in keys):
        return 2
    if any(k.startswith(STAGE1_MARKERS) for k in keys):
        return 1
    if any(k.startswith(UNSUPPORTED_PROJECTION) for k in keys):
        raise VLBridgeError(f"this is a LAVIS InstructBLIP for Vicuna (Blip2VicunaInstruct: {UNSUPPORTED_PROJECTION}* into a Llama "
                            "whose vocabulary LAVIS resized), which the LAVIS importer does not read; import transformers' "
                            "conversion of it instead (a local copy of Salesforce/instructblip-vicuna-7b): vlbridge import "
                            "hf-instructblip DIR OUT_DIR")
    raise VLBridgeError("this does not look like a LAVIS BLIP-2 checkpoint: no ITC/ITM/ITG heads and no opt_proj/t5_proj")


def import_lavis(pth_path: str | Path, assembly: Assembly | str | Path | dict, out_dir: str | Path) -> Path:
    """Convert the Q-Former weights of a LAVIS checkpoint into a vlbridge checkpoint for `assembly`
    (a qformer assembly whose sizes match). The result is loaded once before returning, so a
    mismatch fails here, naming the tensors, rather than at a later load."""
    from vlbridge.plugins.connectors.qformer_convert import from_lavis

    if not isinstance(assembly, Assembly):
        assembly = load_assembly(assembly)
    if assembly.plan.connector.name != "qformer":
        raise VLBridgeError(f"a LAVIS BLIP-2 checkpoint holds a Q-Former; assembly {assembly.name!r} uses {assembly.plan.connector.name!r}")
    lavis = read_connector_weights(pth_path)
    stage = lavis_stage(list(lavis))
    problem = assembly.stage_problem(stage)
    if problem:
        raise VLBridgeError(f"the checkpoint is from stage {stage}, but {problem}")
    _check_projection_family(list(lavis), assembly)
    _check_instruction_reading(list(lavis), stage, assembly)
    _check_tied_decoder(lavis)
    _check_layers(list(lavis), assembly)
    tensors = from_lavis(lavis)
    meta = {"source": f"LAVIS {pth_path}"}
    config = checkpoint_config(assembly)
    created = not Path(out_dir).exists()
    vision = {key: value for key, value in lavis.items() if key.startswith(VISION_PREFIX)}
    if vision:
        config = _with_vision_weights(config, assembly, vision, Path(out_dir))
    out = write_checkpoint(out_dir, config, tensors, stage, meta)
    from vlbridge.modeling.factory import build  # verify now: a mismatch should fail the import, not a later load

    try:
        model = build(config, stage=stage, weights=out, check_shapes=False)
        _check_llm_tensors(lavis, model)
    except WeightsError as exc:
        _remove_import(out, created)
        raise WeightsError(f"LAVIS checkpoint {str(pth_path)!r} does not fit assembly {assembly.name!r} (nothing was kept "
                           f"in {str(out)!r}): {exc}") from None
    return out


def _check_tied_decoder(lavis: dict[str, torch.Tensor]) -> None:
    """The decoder tensors the conversion skips equal what they alias: an untied one would be lost, and
    the imported Q-Former's ITG would read the word embeddings instead."""
    for decoder, alias in TIED_DECODER.items():
        value, tied = lavis.get(decoder), lavis.get(alias)
        if value is not None and (tied is None or value.shape != tied.shape or not torch.equal(value, tied)):
            raise WeightsError(f"the checkpoint's {decoder} is not tied to {alias} (as BERT's and LAVIS's are), and the "
                               "Q-Former's ITG head reads the word embeddings; a checkpoint with an untied decoder cannot be imported")


def _check_llm_tensors(lavis: dict[str, torch.Tensor], model: Any) -> None:
    """The file's LLM tensors (if any) equal the assembly's LLM, which the checkpoint will load: the
    import keeps no LLM of its own, so a tuned or other LLM would be lost without a word."""
    llm = {key.split(".", 1)[1]: value for key, value in lavis.items() if key.startswith(LLM_PREFIXES)}
    if not llm:
        return
    ours = model.llm.model.state_dict() if model.llm is not None else {}
    differ = [key for key, value in llm.items() if key not in ours or not _same_values(ours[key], value)]
    if differ:
        shown = ", ".join(differ[:4]) + (f" ... ({len(differ)} in all)" if len(differ) > 4 else "")
        raise WeightsError(f"the checkpoint holds its LLM, and {shown} differ from (or are not in) the assembly's LLM, which "
                           "the imported checkpoint would run instead; name the checkpoint's own LLM in the assembly")


def _same_values(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Equal in the lower of the two precisions: a LAVIS dump holds the LLM in fp16 where the
    assembly may load it in fp32 (or the reverse), each rounded from the same weights. fp16 against
    bf16 (an OPT assembly run in bf16) has no exact common precision: they agree within a bf16 step."""
    if ours.shape != theirs.shape:
        return False
    if {ours.dtype, theirs.dtype} == {torch.float16, torch.bfloat16}:  # neither holds the other's values: compare within rounding
        return torch.allclose(ours.float(), theirs.float(), rtol=BF16_ROUNDING, atol=FP16_SMALLEST)
    dtype = theirs.dtype if theirs.element_size() <= ours.element_size() else ours.dtype
    return torch.equal(ours.to(dtype), theirs.to(dtype))


def _remove_import(out: Path, created: bool) -> None:
    """Delete what a refused import wrote: left behind, it looked like a checkpoint (it failed only
    when loaded) and kept the CLI from importing again into the same folder."""
    for name in (META_FILE, ASSEMBLY_FILE, WEIGHTS_FILE, IMPORTED_ENCODER_FILE):
        (out / name).unlink(missing_ok=True)
    if created and not any(out.iterdir()):
        out.rmdir()


def _with_vision_weights(config: dict[str, Any], assembly: Assembly, vision: dict[str, torch.Tensor], out: Path) -> dict[str, Any]:
    """`config` whose eva-vit-g loads the checkpoint's fine-tuned ViT, written to `out`/encoder.safetensors."""
    from vlbridge.plugins.encoders.eva_vit_g_convert import convert_lavis_vision_state_dict

    if assembly.plan.encoder.name != "eva-vit-g":
        raise VLBridgeError(f"the checkpoint holds its fine-tuned ViT ({len(vision)} {VISION_PREFIX}* tensors), an EVA ViT-g, "
                            f"but assembly {assembly.name!r} uses {assembly.plan.encoder.name!r}; import it into an eva-vit-g assembly")
    written = write_encoder(out, convert_lavis_vision_state_dict(vision))
    config = copy.deepcopy(config)
    config["encoder"]["options"] = {**(config["encoder"].get("options") or {}), "pretrained": str(written.resolve())}
    return config


def _check_projection_family(keys: list[str], assembly: Assembly) -> None:
    """Refuse a projection trained into the other LLM family (a Blip2OPT file for a FlanT5 assembly, or
    the reverse): the widths may agree, but it would feed an LLM it never saw."""
    dims = assembly.plan.llm_dims
    for marker, (source, encoder_decoder) in PROJECTION_INTO.items():
        if dims is not None and any(k.startswith(marker) for k in keys) and dims.encoder_decoder != encoder_decoder:
            kind = "an encoder-decoder (FlanT5)" if encoder_decoder else "a decoder-only LLM (OPT)"
            raise VLBridgeError(f"the checkpoint's {marker.rstrip('.')} comes from a LAVIS {source}, trained into {kind}, but "
                                f"assembly {assembly.name!r} bridges to {assembly.plan.llm.name!r}, "
                                f"{'an encoder-decoder' if dims.encoder_decoder else 'a decoder-only LLM'}; "
                                "import it into an assembly with the LLM it was trained with")


def _check_instruction_reading(keys: list[str], stage: int, assembly: Assembly) -> None:
    """Refuse an InstructBLIP checkpoint (a stage-2 Q-Former with its text side) for an assembly whose
    Q-Former does not read the instruction, and a BLIP-2 one for an assembly whose does: the queries
    would be computed from other inputs than those they were trained on."""
    if stage != 2:
        return
    text_side = any(k.startswith(INSTRUCTION_MARKER) for k in keys)
    instructblip = text_side and not any(k.startswith(STAGE1_MARKERS) for k in keys)  # InstructBLIP has no ITC/ITM/ITG heads
    aware = bool(getattr(assembly.connector.options, "instruction_aware", False))
    if instructblip and not aware:
        raise VLBridgeError(f"the checkpoint is a LAVIS InstructBLIP (its stage-2 Q-Former keeps the text side that reads the "
                            f"instruction), but assembly {assembly.name!r} has no instruction-aware Q-Former; set the qformer "
                            "option instruction_aware: true")
    if aware and not text_side:
        raise VLBridgeError(f"the checkpoint is a LAVIS BLIP-2 stage-2 model (Blip2OPT / Blip2T5: no Q-Former text side), but "
                            f"assembly {assembly.name!r} has an instruction-aware Q-Former (InstructBLIP), which needs that text "
                            "side; import it into an assembly without instruction_aware")


def _check_layers(keys: list[str], assembly: Assembly) -> None:
    """Refuse, naming the option, a Q-Former with another number of layers, or whose layers
    cross-attend to the image other than the assembly's (`cross_attention_freq`): the strict load
    would list dozens of layer tensors instead."""
    options = assembly.connector.options
    layers = {int(match.group(1)) for key in keys if (match := LAYER.match(key))}
    if layers and max(layers) + 1 != options.size("num_layers"):
        raise VLBridgeError(f"the checkpoint's Q-Former has {max(layers) + 1} layers, but the Q-Former of assembly {assembly.name!r} "
                            f"has {options.size('num_layers')}; set the qformer option num_layers: {max(layers) + 1}")
    theirs = sorted({int(match.group(1)) for key in keys if (match := CROSS_ATTENTION.match(key))})
    count = options.size("num_layers")
    ours = list(range(0, count, options.cross_attention_freq))  # the layers the Q-Former builds with cross-attention
    if not theirs or theirs == ours:
        return
    # the freq that builds their layout, if any: a lone layer 0 takes one of at least num_layers, not a step between two
    freq = next((freq for freq in range(1, count + 1) if list(range(0, count, freq)) == theirs), None)
    hint = f"set the qformer option cross_attention_freq: {freq}" if freq else "no cross_attention_freq gives that layout"
    raise VLBridgeError(f"the checkpoint's Q-Former cross-attends to the image in layers {theirs}, but the Q-Former of assembly "
                        f"{assembly.name!r} in layers {ours} (cross_attention_freq {options.cross_attention_freq}); {hint}")
