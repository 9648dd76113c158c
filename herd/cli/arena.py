"""`herd arena`: a battle arena with an honest record.

    herd arena serve --config arena.toml [--db URL] [--host H] [--port P]
    herd arena rate battles.jsonl [--style-control] [--anchor NAME=RATING] [--json]
    herd arena judge --config arena.toml --judge MODEL --prompts FILE [--judge-url URL]
    herd arena import battles.jsonl --config arena.toml [--db URL]
    herd arena export --config arena.toml [--db URL] [--board human|judge] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from herd.cli import positive_int

SUBCOMMANDS = ("serve", "rate", "judge", "import", "export")


def add_arguments(parser, name):
    parser.epilog = "commands: " + " | ".join(SUBCOMMANDS) + "  (each with --help)"
    parser.add_argument("sub", nargs="?", choices=SUBCOMMANDS, metavar="COMMAND", help=", ".join(SUBCOMMANDS))


def _db_options(p):
    p.add_argument("--config", default=None, help="arena.toml")
    p.add_argument("--db", default=None, help="database: a SQLite path (default arena.db) or postgresql://...")


def _subparser(sub: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"herd arena {sub}")
    if sub == "serve":
        _db_options(p)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8080)
    elif sub == "rate":
        p.add_argument("battles", help="a battle log: JSONL (or a JSON array) in FastChat's clean_battle shape")
        p.add_argument("--style-control", action="store_true", help="also rate with length and markdown regressed out")
        p.add_argument("--anchor", default=None, metavar="NAME=RATING", help="pin one contestant's rating")
        p.add_argument("--json", action="store_true", help="print the board as JSON")
        p.add_argument("--rounds", type=positive_int, default=1000, help="bootstrap rounds (default 1000)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--board", choices=["human", "judge"], default="human",
                       help="which votes (records without `board` are human)")
        p.add_argument("--provisional-votes", type=positive_int, default=30)
        p.add_argument("--exact-mle", action="store_true",
                       help="no L2 penalty (FastChat's sklearn fit uses C=1; the plain MLE diverges while a "
                            "contestant has only won)")
    elif sub == "judge":
        _db_options(p)
        p.add_argument("--judge", required=True, help="the judge: a herd source, or with --judge-url its model id")
        p.add_argument("--judge-url", default=None, help="an OpenAI-compatible endpoint serving the judge")
        p.add_argument("--prompts", required=True, help="prompts: a text file (one a line) or JSONL with `prompt`")
        p.add_argument("--judge-tokens", type=positive_int, default=512)
    elif sub == "import":
        p.add_argument("battles")
        _db_options(p)
    elif sub == "export":
        _db_options(p)
        p.add_argument("--board", choices=["human", "judge"], default=None)
        p.add_argument("--out", default=None, help="write here (default: stdout)")
    return p


def parse_command(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    if argv and argv[0] in SUBCOMMANDS:
        args = _subparser(argv[0]).parse_intermixed_args(argv[1:])
        args.sub = argv[0]
        return args
    return parser.parse_args(argv)


def main(args):
    if not args.sub:
        print(__doc__.strip())
        return 0
    return globals()[f"_{args.sub}"](args)


def _config(args):
    from herd.arena.config import ArenaConfig, load_config

    return load_config(args.config) if args.config else ArenaConfig()


def _store(args, config):
    from herd.arena.store import Store

    return Store(args.db or config.db or "arena.db")


def _arena(args, config, build: bool = True):
    from herd.arena.service import Arena

    arena = Arena(_store(args, config), sampling=config.sampling, max_tokens=config.max_tokens,
                  provisional_votes=config.provisional_votes, bootstrap_rounds=config.bootstrap_rounds)
    if build:
        for spec in config.contestants:
            print(f"herd arena: loading {spec.name} ({spec.url or spec.model})", file=sys.stderr)
            contestant = spec.build(max_batch=config.max_batch, context=config.context)
            arena.enter(contestant)
            note = "" if contestant.verified else " (weights unverified)"
            print(f"herd arena: {spec.name}: {contestant.fingerprint}{note}", file=sys.stderr)
    return arena


def _serve(args):
    import uvicorn

    from herd.arena.web import create_arena_app

    config = _config(args)
    if len(config.contestants) < 2:
        raise SystemExit("herd arena serve: the config needs at least two [[contestant]] entries")
    arena = _arena(args, config)
    for key in arena.retire_absent():
        print(f"herd arena: {key} is no longer in play: marked retired (its battles stay on the board)",
              file=sys.stderr)
    if config.secret_is_random:
        print("herd arena: no [arena] secret set: a random one signs this run's battle tokens (open battles "
              "end with a restart)", file=sys.stderr)
    app = create_arena_app(arena, config)
    print(f"herd arena: http://{args.host}:{args.port}/  (database {arena.store.url.split('@')[-1]})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _anchor(text):
    if text is None:
        return None
    name, sep, value = text.rpartition("=")
    try:
        if name and math.isfinite(float(value)):
            return name, float(value)
    except ValueError:
        pass
    raise SystemExit(f"herd arena rate: --anchor must be NAME=RATING with a finite rating, got {text!r}")


def _rate(args):
    from herd.arena.battlelog import read_battles
    from herd.arena.board import Options, format_table, leaderboard

    records = [r for r in read_battles(args.battles) if r.get("board", "human") == args.board]
    if not records:
        raise SystemExit(f"herd arena rate: {args.battles} has no {args.board} battles")
    options = Options(rounds=args.rounds, seed=args.seed, anchor=_anchor(args.anchor),
                      provisional_votes=args.provisional_votes, penalty_c=None if args.exact_mle else 1.0)
    if args.style_control and not all(r.get("conv_metadata") for r in records):
        raise SystemExit("herd arena rate: --style-control needs the answers (conversation_a/_b) or conv_metadata "
                         "in every record")
    board = leaderboard(records, options, style_control=args.style_control)
    if args.json:
        json.dump(board, sys.stdout, indent=1)
        print()
    else:
        print(format_table(board))
    return 0


def _read_prompts(path):
    from pathlib import Path

    from herd.errors import DataError
    from herd.jsonl import json_objects

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read the prompts ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 (byte {e.start})") from None
    if path.endswith(".jsonl"):
        prompts = []
        for n, record in json_objects(path, text.splitlines()):
            if not isinstance(record.get("prompt"), str):
                raise DataError(f"{path}:{n}: `prompt` must be a string")
            prompts.append(record["prompt"])
        return prompts
    return [line for line in text.splitlines() if line.strip()]


def _judge(args):
    from herd.arena.contestants import ContestantSpec
    from herd.arena.judge import run_judge

    config = _config(args)
    prompts = _read_prompts(args.prompts)
    arena = _arena(args, config)
    if len(arena.playing) < 2:
        raise SystemExit("herd arena judge: the config needs at least two [[contestant]] entries")
    judge = ContestantSpec("judge", args.judge, args.judge_url).build(context=config.context)
    run = run_judge(arena, judge, prompts, judge_tokens=args.judge_tokens)
    print(f"herd arena judge: {run.battles} judged battles stored on the judge board"
          + (f"; {run.unparsed} judgements gave no verdict" if run.unparsed else ""), file=sys.stderr)
    for e in run.errors[:5]:
        print(f"herd arena judge: {e}", file=sys.stderr)
    arena.close()
    return 0


def _import(args):
    from herd.arena.battlelog import read_battles

    store = _store(args, _config(args))
    added = store.import_records(read_battles(args.battles))
    print(f"herd arena import: {added} battles added", file=sys.stderr)
    return 0


def _export(args):
    from herd.arena.battlelog import write_battles

    store = _store(args, _config(args))
    records = store.records(args.board)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            n = write_battles(records, f)
    else:
        n = write_battles(records, sys.stdout)
    print(f"herd arena export: {n} battles", file=sys.stderr)
    return 0
