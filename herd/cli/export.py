"""`herd export SOURCE [--adapter DIR] --to hf|gguf|meta OUT`: merge an adapter and/or convert a model."""

from __future__ import annotations


def add_arguments(parser, name):
    parser.add_argument("source", help="model: GGUF file, HF or Meta directory, herd quantize output or alias")
    parser.add_argument("out", help="HF or Meta directory to create, or GGUF file to write")
    parser.add_argument("--to", required=True, choices=["hf", "gguf", "meta"])
    parser.add_argument("--adapter", default=None, help="a PEFT-format LoRA adapter to merge in first")
    parser.add_argument("--gguf-type", default="F16", choices=["F16", "Q8_0", "F32"])
    parser.add_argument("--hf-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dtype of the HF weights (default float32)")


def main(args):
    import torch

    import herd
    from herd.cli import require
    from herd.finetune.export import check_export_target, export_model, source_lineage

    check_export_target(args.to, args.out)  # before the weights load: never after minutes of work
    if args.to == "gguf":
        require("gguf", "--to gguf writes with gguf-py")
    llm = herd.load(args.source, device="cpu", dtype="float32", quantized=False, adapter=args.adapter)
    lineage = source_lineage(llm, args.adapter)
    path, fp = export_model(llm, args.to, args.out, lineage, gguf_type=args.gguf_type,
                            hf_dtype=getattr(torch, args.hf_dtype) if args.hf_dtype else None)
    print(f"herd export: wrote {path} ({args.to}), fingerprint {fp}")
