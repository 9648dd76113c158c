"""`herd`: argument parsing and a table of subcommands; each command's module is imported only when run."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "run": ("herd.cli.run", "complete one prompt, streamed"),
    "chat": ("herd.cli.chat", "chat interactively with a model"),
    "info": ("herd.cli.info", "show a model's architecture, size, quantization and fingerprint"),
    "list": ("herd.cli.info", "list the models herd can load here by name"),
    "serve": ("herd.cli.serve", "serve a model over an OpenAI-compatible HTTP API"),
    "quantize": ("herd.cli.quantize", "write an HF or Meta checkpoint as int4 (q4) or int8 (q8) weights"),
    "finetune": ("herd.cli.finetune", "fine-tune a model: LoRA, QLoRA, full or DPO"),
    "export": ("herd.cli.export", "merge an adapter and write a model as an HF or Meta directory or a GGUF file"),
    "bench": ("herd.cli.bench", "decode/prefill speed, first-token time and memory vs llama.cpp and HF"),
    "eval": ("herd.cli.eval", "score a model on tasks; verify, compare and sign the reports"),
    "arena": ("herd.cli.arena", "battle arena: serve, rate a battle log, judge with a model"),
    "plan": ("herd.cli.plan", "memory per device under each parallel layout, from the config alone"),
}


def _whole_number_at_least(least: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    return parse


positive_int = _whole_number_at_least(1)  # argparse types: counts of tokens, threads, sequences ...
non_negative_int = _whole_number_at_least(0)


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=positive_int, default=None, help="most tokens to generate")
    g.add_argument("--temperature", type=float, default=0.7, help="0 for greedy (default 0.7)")
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--top-k", type=non_negative_int, default=0, help="0 disables")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="float32 on a quantized file: the exact dequantized path")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: physical cores)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="torch.compile the decode step (auto: where herd measured it faster)")
    parser.add_argument("--adapter", action="append", default=None, metavar="[NAME=]DIR",
                        help="a PEFT-format LoRA adapter directory to apply (the base then loads dense); "
                             "NAME=DIR, repeated, serves several over one base, each request choosing by its "
                             "`model` (herd serve)"),
    parser.add_argument("--mmproj", default=None, metavar="PATH",
                        help="the image projector file (GGUF mmproj, as llama.cpp's converter writes it) of a "
                             "Llama 4 text GGUF; without it a text GGUF takes text only")
    parser.add_argument("--tp", type=positive_int, default=None, metavar="N",
                        help="tensor parallelism over the N processes of a torchrun job "
                             "(torchrun --nproc-per-node N -m herd ...); rank 0 does the command's work")
    parser.add_argument("--ep", type=positive_int, default=None, metavar="N",
                        help="Llama 4's routed experts split over N processes (1 or the job's size)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="herd", description="Every Llama generation in one PyTorch codebase.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = {}
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p, name)
        parser.commands[name] = p
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Options anywhere, as people type them: `herd run model.gguf --raw "Once upon a time"`. A command's
    own arguments are parsed intermixed (argparse cannot do that across subparsers, so the command is
    picked here and its parser run on the rest)."""
    if argv and argv[0] in parser.commands:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        if hasattr(module, "parse_command"):  # a command with commands of its own (`herd eval verify ...`)
            args = module.parse_command(parser.commands[argv[0]], argv[1:])
        else:
            args = parser.commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command, args.version = argv[0], False
        return args
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, sys.argv[1:] if argv is None else list(argv))
    if args.version:
        from herd import __version__

        print(f"herd {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 0
    from herd.errors import HerdError

    try:
        return importlib.import_module(COMMANDS[args.command][0]).main(args) or 0
    except HerdError as e:
        print(f"herd {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def model_options(args: argparse.Namespace) -> dict:
    options = {"threads": getattr(args, "threads", None)}
    given = getattr(args, "adapter", None) or []
    named = [a for a in given if "=" in a]
    if named:
        if len(named) != len(given):
            raise SystemExit("herd: --adapter: give every adapter as NAME=DIR, or one plain DIR")
        options["adapters"] = dict(a.split("=", 1) for a in named)
        if len(options["adapters"]) != len(named):
            raise SystemExit("herd: --adapter: two adapters with one name")
    elif len(given) > 1:
        raise SystemExit("herd: --adapter: several adapters need names (NAME=DIR)")
    elif given:
        options["adapter"] = given[0]
    for key in ("tp", "ep", "mmproj"):
        if getattr(args, key, None) is not None:
            options[key] = getattr(args, key)
    compile_ = getattr(args, "compile", "auto")
    if compile_ != "auto":
        options["compile"] = compile_ == "on"
    return options


def load_with_progress(source, device=None, dtype=None, **options):
    """herd.load with a progress bar on stderr (a person watches it; pipes see nothing). In a
    tensor-parallel job (--tp/--ep) only rank 0 goes on with the command: the other ranks follow its
    forwards here and exit when it ends."""
    from rich.progress import BarColumn, Progress, TextColumn

    import herd

    if options.get("tp") is not None or options.get("ep") is not None:
        import atexit

        from herd.distributed import shutdown

        llm = herd.load(source, device=device, dtype=dtype, **options)
        if llm.model.layout.rank != 0:
            llm.follow()
            shutdown()
            raise SystemExit(0)
        atexit.register(shutdown, llm.model)
        return llm

    with Progress(
        TextColumn("loading {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} tensors"),
        transient=True, console=_stderr_console(),
    ) as bar:
        task = bar.add_task(str(source or "default model"), total=None)
        return herd.load(source, device=device, dtype=dtype, progress=lambda i, n: bar.update(task, completed=i, total=n),
                         **options)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)
