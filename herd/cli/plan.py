"""`herd plan SOURCE --devices 8xH100-80GB`: the memory plan of a model from its configuration (herd.plan)."""

from __future__ import annotations


def add_arguments(parser, name):
    parser.add_argument("source", help="HF directory (config.json), Meta directory (params.json) or GGUF file; "
                                       "no weights are read")
    parser.add_argument("--devices", required=True, help="COUNTxNAME-SIZE, e.g. 8xH100-80GB, 16xH100-80GB, 2xCPU-64GB")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="weights' dtype (default bfloat16; GGUF files are dequantized to it under --tp)")
    parser.add_argument("--kv-dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="KV cache dtype (default: the weights')")
    parser.add_argument("--memory-fraction", type=float, default=0.9,
                        help="share of each device's memory to plan with (default 0.9)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def main(args):
    from herd.errors import HerdError
    from herd.plan import Devices, plan, plan_json, read_config, render

    if not 0 < args.memory_fraction <= 1:
        raise HerdError(f"--memory-fraction must lie in (0, 1], got {args.memory_fraction}")
    devices = Devices.parse(args.devices)
    model_args, source = read_config(args.source)
    plans = plan(model_args, devices, args.dtype, args.kv_dtype, args.memory_fraction)
    print(plan_json(model_args, devices, plans) if args.json else
          render(model_args, source, devices, plans, args.dtype, args.kv_dtype, args.memory_fraction))
    return 0
