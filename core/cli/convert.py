"""`vlbridge import hf-blip2|hf-instructblip|hf-llava DIR OUT_DIR`, `vlbridge import lavis ...` and
`vlbridge export hf-blip2|hf-instructblip|hf-llava CHECKPOINT OUT_DIR`."""

from __future__ import annotations

import argparse
import importlib
from typing import Any, Callable

from vlbridge.assemblies.assembly import load_assembly
from vlbridge.cli.model_source import resolved_directory
from vlbridge.errors import VLBridgeError
from vlbridge.files.atomic import held_files

# format -> (module, importer, exporter, what the foreign directory is); the converters are imported on use
TRANSFORMERS_FORMATS: dict[str, tuple[str, str, str, str]] = {
    "hf-blip2": ("vlbridge.interop.hf_blip2", "import_hf_blip2", "export_hf_blip2", "transformers BLIP-2"),
    "hf-instructblip": ("vlbridge.interop.hf_instructblip", "import_hf_instructblip", "export_hf_instructblip", "transformers InstructBLIP"),
    "hf-llava": ("vlbridge.interop.hf_llava", "import_hf_llava", "export_hf_llava", "transformers LLaVA"),
}
IMPORT_HELP = {
    "hf-blip2": "a transformers BLIP-2 directory (save_pretrained / a local hub copy)",
    "hf-instructblip": "a transformers InstructBLIP directory with its processor (qformer_tokenizer/)",
    "hf-llava": "a transformers LlavaForConditionalGeneration directory (e.g. llava-hf/llava-1.5-7b-hf)",
}


def _converter(fmt: str, which: int) -> Callable[..., Any]:
    module, *names = TRANSFORMERS_FORMATS[fmt][:3]
    return getattr(importlib.import_module(module), names[which])


def add_parsers(sub: argparse._SubParsersAction) -> None:
    imp = sub.add_parser("import", help="convert a foreign checkpoint into a vlbridge checkpoint")
    imp_sub = imp.add_subparsers(dest="format", metavar="FORMAT", required=True)
    for fmt, help_text in IMPORT_HELP.items():
        parser = imp_sub.add_parser(fmt, help=help_text, description=f"Convert {help_text} into a vlbridge checkpoint.")
        parser.add_argument("source", metavar="DIR", help="the folder save_pretrained wrote (config.json, the weights, the "
                            "tokenizer and processor files); a local copy of a hub repository works too")
        parser.add_argument("out", metavar="OUT_DIR", help="where the vlbridge checkpoint is written (a new or empty folder); "
                            "load it with vlbridge.load(OUT_DIR) or --checkpoint OUT_DIR")
        parser.set_defaults(func=cmd_import_transformers)
        if fmt == "hf-llava":
            parser.add_argument("--prompt-template", default=None, metavar="TEMPLATE",
                                help="how prompts are worded, '{}' for the prompt and '<image>' for the visual tokens "
                                     "(default: as the directory's processor chat template words one image and one text, else "
                                     "LLaVA-1.5's 'USER: <image>\\n{} ASSISTANT:')")
    lavis = imp_sub.add_parser("lavis", help="a LAVIS BLIP-2 .pth state dict, into an assembly of your choice",
                               description="Convert a LAVIS BLIP-2 checkpoint into a vlbridge checkpoint of the assembly "
                                           "its Q-Former belongs to.")
    lavis.add_argument("source", metavar="PTH", help="a LAVIS checkpoint: blip2_pretrained.pth (stage 1) or a stage-2 .pth "
                       "(read with torch.load(weights_only=True)); a ViT it holds (a COCO fine-tune's) becomes the "
                       "eva-vit-g weights")
    lavis.add_argument("out", metavar="OUT_DIR", help="where the vlbridge checkpoint is written (a new or empty folder); "
                       "load it with vlbridge.load(OUT_DIR) or --checkpoint OUT_DIR")
    lavis.add_argument("--assembly", "-a", required=True, metavar="PRESET_OR_YAML", help="the assembly the Q-Former belongs to")
    lavis.set_defaults(func=cmd_import_lavis)
    exp = sub.add_parser("export", help="convert a vlbridge checkpoint into a foreign format")
    exp_sub = exp.add_subparsers(dest="format", metavar="FORMAT", required=True)
    for fmt, (_, _, _, what) in TRANSFORMERS_FORMATS.items():
        parser = exp_sub.add_parser(fmt, help=f"a {what} directory",
                                    description=f"Convert a vlbridge checkpoint into a {what} directory.")
        parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="a vlbridge checkpoint: model.save(DIR), a training "
                            "run's checkpoints/step-N (or its output_dir: the latest step), or what `vlbridge import` wrote")
        parser.add_argument("out", metavar="OUT_DIR", help=f"where the {what} directory is written (a new or empty folder), for "
                            "transformers' from_pretrained(OUT_DIR) (config.json, model.safetensors, tokenizer and processor files)")
        parser.add_argument("--allow-approximate", action="store_true",
                            help="export even where the format cannot hold the model exactly (the command prints the "
                                 "measured max abs difference of the logits on a probe input); refused without it")
        parser.set_defaults(func=cmd_export_transformers)


def fresh_folder(out: str, what: str) -> None:
    """OUT_DIR is a new or empty folder: writing into one that holds files would mix two models' files
    (or overwrite a checkpoint the user meant to keep)."""
    try:
        held = held_files(out)
    except NotADirectoryError as exc:
        raise VLBridgeError(f"OUT_DIR {exc}; give a new or empty folder for the {what}") from None
    if held:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise VLBridgeError(f"OUT_DIR {out!r} already holds files ({shown}); give a new or empty folder for the {what}, "
                            "or remove that one first")


def cmd_import_transformers(args: argparse.Namespace) -> int:
    fresh_folder(args.out, "vlbridge checkpoint")
    extra = {"prompt_template": args.prompt_template} if getattr(args, "prompt_template", None) is not None else {}
    out = _converter(args.format, 0)(args.source, args.out, **extra)
    print(f"wrote vlbridge checkpoint {out}; use it with --checkpoint {out} or vlbridge.load({str(out)!r})")
    return 0


def cmd_import_lavis(args: argparse.Namespace) -> int:
    fresh_folder(args.out, "vlbridge checkpoint")
    assembly = load_assembly(args.assembly)  # torch-free: a misspelt preset is reported before torch loads
    from vlbridge.interop.lavis import import_lavis

    out = import_lavis(args.source, assembly, args.out)
    print(f"wrote vlbridge checkpoint {out}")
    return 0


def cmd_export_transformers(args: argparse.Namespace) -> int:
    import warnings

    import vlbridge
    from vlbridge.interop.export_fidelity import ApproximateExportWarning, LeftOutOfExportWarning

    checkpoint = resolved_directory(args, "checkpoint", "CHECKPOINT_DIR")  # the messages -c gives, before the model loads
    fresh_folder(args.out, f"{TRANSFORMERS_FORMATS[args.format][3]} directory")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ApproximateExportWarning)
        warnings.simplefilter("always", LeftOutOfExportWarning)
        out = _converter(args.format, 1)(vlbridge.load(checkpoint), args.out, allow_approximate=args.allow_approximate)
    for warning in caught:
        if issubclass(warning.category, ApproximateExportWarning):
            print(f"approximate export: {warning.message}")
        elif issubclass(warning.category, LeftOutOfExportWarning):
            print(f"note: {warning.message}")
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    print(f"wrote {TRANSFORMERS_FORMATS[args.format][3]} directory {out}")
    return 0
