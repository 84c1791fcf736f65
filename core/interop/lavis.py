"""Import a LAVIS BLIP-2 checkpoint (a `.pth` state dict such as blip2_pretrained.pth, or a stage-2
`Blip2OPT`/`Blip2T5` checkpoint) into a vlbridge checkpoint for an assembly you choose.

LAVIS saves only what trained: the Q-Former side (query tokens, `Qformer.*`, `ln_vision`, heads,
`opt_proj`/`t5_proj`), never the frozen ViT or LLM, which the assembly names instead. The file is
read with `weights_only=True`.
"""

from __future__ import annotations

from pathlib import Path

from vlbridge.assemblies.assembly import Assembly, load_assembly
from vlbridge.assemblies.saved import checkpoint_config
from vlbridge.errors import VLBridgeError
from vlbridge.files.checkpoint import read_connector_weights, write_checkpoint

STAGE1_MARKERS = ("Qformer.cls.", "vision_proj.", "text_proj.", "itm_head.")
STAGE2_MARKERS = ("opt_proj.", "t5_proj.")
PROJECTION_INTO = {"opt_proj.": ("Blip2OPT", False), "t5_proj.": ("Blip2T5", True)}  # -> (LAVIS model, LLM is encoder-decoder)


def lavis_stage(keys: list[str]) -> int:
    """Stage 1 checkpoints carry the ITC/ITM/ITG heads; stage-2 ones the LLM projection."""
    if any(k.startswith(STAGE2_MARKERS) for k in keys):
        return 2
    if any(k.startswith(STAGE1_MARKERS) for k in keys):
        return 1
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
    tensors = from_lavis(lavis)
    meta = {"source": f"LAVIS {pth_path}"}
    out = write_checkpoint(out_dir, checkpoint_config(assembly), tensors, stage, meta)
    from vlbridge.modeling.factory import build  # verify now: a mismatch should fail the import, not a later load

    build(assembly, stage=stage, weights=out, check_shapes=False)
    return out


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
