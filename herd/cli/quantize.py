"""`herd quantize SOURCE --to q4|q8 OUT`: an HF or Meta checkpoint as a directory herd loads quantized."""

from __future__ import annotations


def add_arguments(parser, name):
    parser.add_argument("source", help="HF directory (config.json + safetensors) or Meta checkpoint directory")
    parser.add_argument("--to", dest="scheme", required=True, choices=["q4", "q8"],
                        help="q4: int4, groups of --group-size with scale and zero; q8: int8 per output channel")
    parser.add_argument("out", help="directory to write (new or empty)")
    parser.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128, 256])


def main(args):
    import time

    from herd.formats import open_checkpoint
    from herd.formats.herdq import write_herdq
    from herd.models import resolve

    started = time.perf_counter()
    checkpoint = open_checkpoint(resolve(args.source))
    out = write_herdq(checkpoint, args.out, args.scheme, args.group_size)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({args.scheme}, {size / 1e6:,.1f} MB) in {time.perf_counter() - started:.1f} s; "
          f"load it with: herd run {out} \"Hello\"")
