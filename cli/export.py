"""`tune export gguf`: write a checkpoint (optionally + LoRA adapter) as a GGUF file.

    tune export gguf --checkpoint DIR [--adapter ADAPTER_DIR] --out model.gguf
                     [--dtype f16|bf16|q8_0|q4_k_m] [--tokenizer PATH] [--force] [--no-modelfile]

The file runs in llama.cpp (``llama-cli -m model.gguf``) and, with the Modelfile written next
to it (``model.Modelfile``), in Ollama (``ollama create NAME -f model.Modelfile``). Needs the
``gguf`` extra: ``pip install 'tunelab[gguf]'``.
"""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "cmd_export_gguf"]

_DTYPE_HELP = "f16 | bf16 | q8_0 | q4_k_m (llama.cpp's 4-bit K-quant mix); default f16"


def add_parser(subparsers) -> None:
    export = subparsers.add_parser(
        "export",
        help="export a checkpoint for another runtime (gguf: llama.cpp / Ollama)",
        description="Export a checkpoint for another runtime.",
    )
    formats = export.add_subparsers(dest="format", metavar="FORMAT", parser_class=type(export))
    p = formats.add_parser(
        "gguf",
        help="one .gguf file for llama.cpp and Ollama (+ an Ollama Modelfile)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="HF checkpoint folder (e.g. OUTPUT/step_N/merged, or the base)")
    p.add_argument("--adapter", default=None, help="PEFT LoRA folder to merge in (e.g. OUTPUT/step_N/adapter)")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--dtype", default="f16", help=_DTYPE_HELP)
    p.add_argument("--tokenizer", default=None, help="tokenizer file or folder (default: found in --checkpoint)")
    p.add_argument("--force", action="store_true", help="overwrite --out (and its Modelfile) if it exists")
    p.add_argument("--no-modelfile", action="store_true", help="do not write the Ollama Modelfile")
    p.set_defaults(func=cmd_export_gguf)
    export.set_defaults(func=lambda args: (export.print_help(), 1)[1])


def cmd_export_gguf(args: argparse.Namespace) -> int:
    """Run the export; TunelabErrors propagate to ``tune``'s one-line error printer."""
    from tunelab.training.export import export_gguf

    out = export_gguf(
        args.checkpoint,
        args.out,
        dtype=args.dtype,
        adapter_dir=args.adapter,
        tokenizer_path=args.tokenizer,
        overwrite=args.force,
        modelfile=not args.no_modelfile,
    )
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.dtype})")
    if not args.no_modelfile:
        print(f"Ollama: ollama create NAME -f {out.with_suffix('.Modelfile')}")
    return 0
