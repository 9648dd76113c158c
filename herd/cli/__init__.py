"""`herd`: argument parsing and a table of subcommands; each command's module is imported only when run."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
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


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (`herd run: argument --top-k: 'x' is not a whole number (see herd run
    --help)`), not a usage block a person has to read the error out of."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


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


def finite_float(text: str) -> float:
    """argparse type: a number that is not nan or inf (ranges are checked where the value is used)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def thread_count(text: str) -> int:
    """argparse type for --threads: 1 up to the CPUs this process may use (more only oversubscribes them, and
    a count in the thousands makes the thread pools fail to start)."""
    value = positive_int(text)
    if value > usable_cpus():
        raise argparse.ArgumentTypeError(f"{value} threads, but this process may use {usable_cpus()} CPUs: give at "
                                         f"most {usable_cpus()}")
    return value


def device_option(text: str) -> str:
    """argparse type for --device: a device torch names and this machine has, checked before any loading."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: give cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device torch can use")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s), cuda:0 to "
                                             f"cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no MPS device torch can use")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: herd runs on cpu or cuda")
    return text


SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
HERD_SAMPLING = {"temperature": 0.7, "top_p": 0.9}  # where neither the flags nor the model say


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling (default: the settings the model ships, else temperature 0.7, top-p 0.9)")
    g.add_argument("--max-tokens", type=positive_int, default=None, help="most tokens to generate")
    g.add_argument("--temperature", type=finite_float, default=None, help="0 for greedy")
    g.add_argument("--top-p", type=finite_float, default=None, help="1 disables")
    g.add_argument("--top-k", type=non_negative_int, default=None, help="0 disables")
    g.add_argument("--min-p", type=finite_float, default=None, help="0 disables")
    g.add_argument("--repetition-penalty", type=finite_float, default=None, help="1 disables")
    g.add_argument("--seed", type=int, default=None)


def given_sampling(args: argparse.Namespace) -> dict:
    """The sampling flags given on the command line, checked (herd.sampling.SamplingParams) before any loading:
    HerdError naming the flag."""
    from herd.errors import HerdError, SamplingError
    from herd.sampling import SamplingParams

    given = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k, None) is not None}
    try:
        SamplingParams(**given)
    except SamplingError as e:
        raise HerdError(f"--{e.field.replace('_', '-')} {given[e.field]}: {e.problem}") from None
    return given


def sampling_settings(llm, given: dict) -> tuple[dict, str]:
    """(the sampling keywords to generate with, where they come from, in words): the flags given, then the
    settings the model ships (LLM.sampling_defaults), then herd's own."""
    shipped, source = llm.sampling_defaults
    settings = {**HERD_SAMPLING, **shipped, **given}
    parts = []
    if shipped and set(shipped) - set(given):
        parts.append(source)
    if given:
        parts.append("your flags")
    if set(HERD_SAMPLING) - set(shipped) - set(given):
        parts.append("herd's defaults")
    shown = ", ".join(f"{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"{k.replace('_', '-')} {v}"
                      for k, v in settings.items() if k != "seed" or v is not None)
    return settings, f"{shown} (from {' and '.join(parts)})"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=device_option, default=None,
                        help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="float32 on a quantized file: the exact dequantized path")
    parser.add_argument("--threads", type=thread_count, default=None, help="CPU threads (default: physical cores)")
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
    parser = Parser(prog="herd", description="Every Llama generation in one PyTorch codebase.")
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


# Packages some commands need beyond the core: import name -> the extra of llama-herd that installs it
# (pyproject.toml), or None for a dependency of herd itself that an environment may still lack
OPTIONAL = {"matplotlib": "finetune", "cryptography": "eval", "lm_eval": "lm-eval", "sqlalchemy": "arena",
            "scipy": "arena", "httpx": "arena", "psycopg": "arena", "gguf": None}
PACKAGES = {"gguf": "gguf", "lm_eval": "lm-eval", "sqlalchemy": "SQLAlchemy", "psycopg": "psycopg[binary]"}


def install_hint(module: str, extra: str | None) -> str:
    if extra is None:
        return (f"this needs the {module} package, a dependency of herd this environment lacks: "
                f"pip install '{PACKAGES.get(module, module)}'")
    return (f"this needs the {module} package, which the plain install leaves out: pip install 'llama-herd[{extra}]' "
            f"(in a checkout: .venv/bin/pip install -e '.[{extra}]')")


def require(module: str, purpose: str) -> None:
    """HerdError naming the extra to install when `module` is missing: called before anything is loaded."""
    from herd.errors import HerdError

    if importlib.util.find_spec(module) is None:
        raise HerdError(f"{purpose}: {install_hint(module, OPTIONAL[module])}")


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
    except ModuleNotFoundError as e:  # an optional dependency a command's own check did not name
        module = (e.name or "").split(".")[0]
        if module not in OPTIONAL:
            raise
        print(f"herd {args.command}: {install_hint(module, OPTIONAL[module])}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def model_options(args: argparse.Namespace) -> dict:
    from herd.errors import HerdError

    options = {"threads": getattr(args, "threads", None)}
    given = getattr(args, "adapter", None) or []
    named = [a for a in given if "=" in a]
    if named:
        if len(named) != len(given):
            raise HerdError("--adapter: give every adapter as NAME=DIR, or one plain DIR")
        options["adapters"] = dict(a.split("=", 1) for a in named)
        if len(options["adapters"]) != len(named):
            raise HerdError("--adapter: two adapters with one name")
    elif len(given) > 1:
        raise HerdError("--adapter: several adapters need names (NAME=DIR)")
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
    from rich.progress import Progress

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

    with Progress(*load_columns(), transient=True, console=_stderr_console()) as bar:
        task = bar.add_task(str(source or "default model"), total=None, count="reading the header")
        return herd.load(source, device=device, dtype=dtype, **options,
                         progress=lambda i, n: bar.update(task, completed=i, total=n, count=f"{i}/{n} tensors"))


def load_columns():
    """The load bar: the source, a bar, and the tensors read so far (what it is doing until the count is known)."""
    from rich.progress import BarColumn, TextColumn

    return TextColumn("loading {task.description}"), BarColumn(), TextColumn("{task.fields[count]}")


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)
