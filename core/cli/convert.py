"""`vlbridge import hf-blip2|hf-instructblip|hf-llava DIR OUT_DIR`, `vlbridge import lavis ...` and
`vlbridge export hf-blip2|hf-instructblip|hf-llava CHECKPOINT OUT_DIR`."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    imp = sub.add_parser("import", help="convert a foreign checkpoint into a vlbridge checkpoint")
    imp_sub = imp.add_subparsers(dest="format", metavar="FORMAT", required=True)
    hf = imp_sub.add_parser("hf-blip2", help="a transformers BLIP-2 directory (save_pretrained / a local hub copy)")
    hf.add_argument("source", metavar="DIR")
    hf.add_argument("out", metavar="OUT_DIR")
    hf.set_defaults(func=cmd_import_hf)
    instruct = imp_sub.add_parser("hf-instructblip", help="a transformers InstructBLIP directory with its processor (qformer_tokenizer/)")
    instruct.add_argument("source", metavar="DIR")
    instruct.add_argument("out", metavar="OUT_DIR")
    instruct.set_defaults(func=cmd_import_instructblip)
    llava = imp_sub.add_parser("hf-llava", help="a transformers LlavaForConditionalGeneration directory (e.g. llava-hf/llava-1.5-7b-hf)")
    llava.add_argument("source", metavar="DIR")
    llava.add_argument("out", metavar="OUT_DIR")
    llava.add_argument("--prompt-template", default=None, metavar="TEMPLATE",
                       help="how prompts are worded, '{}' for the prompt and '<image>' for the visual tokens "
                            "(default LLaVA-1.5's 'USER: <image>\\n{} ASSISTANT:')")
    llava.set_defaults(func=cmd_import_llava)
    lavis = imp_sub.add_parser("lavis", help="a LAVIS BLIP-2 .pth state dict, into an assembly of your choice")
    lavis.add_argument("source", metavar="PTH")
    lavis.add_argument("out", metavar="OUT_DIR")
    lavis.add_argument("--assembly", "-a", required=True, metavar="PRESET_OR_YAML", help="the assembly the Q-Former belongs to")
    lavis.set_defaults(func=cmd_import_lavis)
    exp = sub.add_parser("export", help="convert a vlbridge checkpoint into a foreign format")
    exp_sub = exp.add_subparsers(dest="format", metavar="FORMAT", required=True)
    hf_out = exp_sub.add_parser("hf-blip2", help="a transformers Blip2ForConditionalGeneration directory")
    hf_out.add_argument("checkpoint", metavar="CHECKPOINT_DIR")
    hf_out.add_argument("out", metavar="OUT_DIR")
    hf_out.set_defaults(func=cmd_export_hf)
    instruct_out = exp_sub.add_parser("hf-instructblip", help="a transformers InstructBlipForConditionalGeneration directory")
    instruct_out.add_argument("checkpoint", metavar="CHECKPOINT_DIR")
    instruct_out.add_argument("out", metavar="OUT_DIR")
    instruct_out.set_defaults(func=cmd_export_instructblip)
    llava_out = exp_sub.add_parser("hf-llava", help="a transformers LlavaForConditionalGeneration directory")
    llava_out.add_argument("checkpoint", metavar="CHECKPOINT_DIR")
    llava_out.add_argument("out", metavar="OUT_DIR")
    llava_out.set_defaults(func=cmd_export_llava)


def cmd_import_hf(args: argparse.Namespace) -> int:
    from vlbridge.hf_blip2 import import_hf_blip2

    out = import_hf_blip2(args.source, args.out)
    print(f"wrote vlbridge checkpoint {out}; use it with --checkpoint {out} or vlbridge.load({str(out)!r})")
    return 0


def cmd_import_instructblip(args: argparse.Namespace) -> int:
    from vlbridge.hf_instructblip import import_hf_instructblip

    out = import_hf_instructblip(args.source, args.out)
    print(f"wrote vlbridge checkpoint {out}; use it with --checkpoint {out} or vlbridge.load({str(out)!r})")
    return 0


def cmd_import_llava(args: argparse.Namespace) -> int:
    from vlbridge.hf_llava import LLAVA_15_TEMPLATE, import_hf_llava

    template = args.prompt_template if args.prompt_template is not None else LLAVA_15_TEMPLATE
    out = import_hf_llava(args.source, args.out, prompt_template=template)
    print(f"wrote vlbridge checkpoint {out}; use it with --checkpoint {out} or vlbridge.load({str(out)!r})")
    return 0


def cmd_import_lavis(args: argparse.Namespace) -> int:
    from vlbridge.lavis import import_lavis

    out = import_lavis(args.source, args.assembly, args.out)
    print(f"wrote vlbridge checkpoint {out}")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    import vlbridge
    from vlbridge.hf_blip2 import export_hf_blip2

    out = export_hf_blip2(vlbridge.load(args.checkpoint), args.out)
    print(f"wrote transformers BLIP-2 directory {out}")
    return 0


def cmd_export_llava(args: argparse.Namespace) -> int:
    import vlbridge
    from vlbridge.hf_llava import export_hf_llava

    out = export_hf_llava(vlbridge.load(args.checkpoint), args.out)
    print(f"wrote transformers LLaVA directory {out}")
    return 0


def cmd_export_instructblip(args: argparse.Namespace) -> int:
    import vlbridge
    from vlbridge.hf_instructblip import export_hf_instructblip

    out = export_hf_instructblip(vlbridge.load(args.checkpoint), args.out)
    print(f"wrote transformers InstructBLIP directory {out}")
    return 0
