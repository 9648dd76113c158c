"""`herd eval`: score a model on tasks, and check, compare and sign the reports.

    herd eval SOURCE --task mc --data items.jsonl --out report.json
    herd eval --server http://127.0.0.1:8000 --task mc --data items.jsonl
    herd eval verify report.json SOURCE [--sample K | --full] [--public-key KEY.pub]
                  (exit 0: holds; 1: does not hold; 3: not verified, something could not be checked)
    herd eval compare a.json b.json ... [--allow-different-models]
    herd eval keygen KEY          (writes KEY and KEY.pub)
    herd eval sign report.json --key KEY
"""

from __future__ import annotations

import argparse
import sys

from herd.cli import add_model_options, load_with_progress, model_options, non_negative_int, positive_int

SUBCOMMANDS = ("verify", "compare", "sign", "keygen", "contamination")


def add_arguments(parser, name):
    parser.epilog = ("other commands: herd eval verify REPORT SOURCE | compare REPORT... | sign REPORT --key KEY | "
                     "keygen KEY  (each with --help)")
    parser.add_argument("source", nargs="?", default=None,
                        help="GGUF file, model directory or alias (default smollm2-135m; not with --server)")
    parser.add_argument("--task", action="append", default=None, metavar="NAME[=DATA]",
                        help="task to run (repeatable): perplexity, mc, mc-arithmetic, gsm8k, retrieval, reasoning; "
                             "NAME=PATH gives that task its data")
    parser.add_argument("--data", default=None, help="data file for the task(s) (JSONL, or text for perplexity)")
    parser.add_argument("--limit", type=positive_int, default=None, help="score only the first N items")
    parser.add_argument("--seed", type=int, default=0, help="fixes few-shot examples, generated items, samples")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--html", default=None, help="write an HTML report here")
    parser.add_argument("--name", default=None, help="the model's name in the report (default: from the file)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="sequences run together (default 16)")
    parser.add_argument("--scoring", choices=["batched", "engine"], default="batched",
                        help="log-likelihoods as padded [B, T] forwards (fast) or one engine prefill per prompt "
                             "(bit-identical at any batch size)")
    parser.add_argument("--context", type=positive_int, default=None,
                        help="perplexity window in tokens (default: the model's context less one)")
    g = parser.add_argument_group("generative tasks")
    g.add_argument("--shots", type=non_negative_int, default=None, help="few-shot examples (gsm8k default 8)")
    g.add_argument("--train", default=None, help="gsm8k: the JSONL the shots come from (default train.jsonl "
                                                 "beside --data)")
    g.add_argument("--chat", action="store_true", default=None, help="use the model's chat template")
    g.add_argument("--max-tokens", type=positive_int, default=None, help="most tokens generated per item")
    g.add_argument("--self-consistency", type=positive_int, default=None, metavar="K",
                   help="reasoning mode: also sample K chain-of-thought answers per item and take the majority")
    g.add_argument("--sc-temperature", type=float, default=None, help="temperature of those samples (0.7)")
    g.add_argument("--lengths", type=number_list(int), default=None,
                   help="retrieval: haystack lengths in tokens, e.g. 256,512,1024")
    g.add_argument("--depths", type=number_list(float), default=None,
                   help="retrieval: needle depths in 0..1, e.g. 0,0.5,1")
    g.add_argument("--needles", type=positive_int, default=None, help="retrieval: needles per haystack")
    g.add_argument("--filler", default=None, help="retrieval: a text file to build haystacks from")
    g.add_argument("--steps", type=number_list(int), default=None,
                   help="reasoning: problem depths, e.g. 1,2,4,8")
    parser.add_argument("--lm-eval", default=None, metavar="TASKS",
                        help="run lm-evaluation-harness tasks (comma-separated) on herd (needs lm-eval installed)")
    parser.add_argument("--lm-eval-include", default=None, metavar="DIR", help="lm-eval task YAMLs of your own")
    parser.add_argument("--shots-lm-eval", type=non_negative_int, default=None, help=argparse.SUPPRESS)
    s = parser.add_argument_group("server")
    s.add_argument("--server", default=None, metavar="URL", help="score through an OpenAI-compatible endpoint")
    s.add_argument("--model", default=None, help="the model id to send to the server (default: its first)")
    s.add_argument("--api-key", default=None)
    add_model_options(parser)


def _subparser(which: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"herd eval {which}")
    if which == "verify":
        p.description = "re-check a report against weights: fingerprint, data, items, metrics, signature"
        p.add_argument("report")
        p.add_argument("source", nargs="?", default=None, help="the weights to check (default smollm2-135m)")
        p.add_argument("--sample", type=positive_int, default=20, help="items re-scored per task (default 20)")
        p.add_argument("--full", action="store_true", help="re-score every item")
        p.add_argument("--seed", type=int, default=None,
                       help="draws the sample (default: a fresh seed each run, printed so a run can be repeated)")
        p.add_argument("--public-key", default=None, help="require a signature by this key")
        p.add_argument("--data", action="append", default=[], metavar="TASK=PATH", type=task_path,
                       help="where a task's data is now, if not where the report says")
        p.add_argument("--tolerance", type=non_negative_float, default=None,
                       help="for re-scored log-likelihoods (default: exact in-process, where the sample runs in the "
                            "same forwards as the run; 1e-5 through --server)")
        p.add_argument("--batch-size", type=positive_int, default=None, help="default: the report's")
        p.add_argument("--server", default=None, metavar="URL", help="re-score through an endpoint")
        p.add_argument("--model", default=None)
        p.add_argument("--api-key", default=None)
        add_model_options(p)
    elif which == "compare":
        p.description = ("reports side by side; refuses one name (or look-alike names) with different fingerprints, "
                         "and one task name with different definitions")
        p.add_argument("reports", nargs="+")
        p.add_argument("--allow-different-models", action="store_true")
        p.add_argument("--allow-different-tasks", action="store_true",
                       help="show one task name with different definitions in separate rows instead of refusing")
    elif which == "sign":
        p.description = "sign a report with an Ed25519 private key"
        p.add_argument("report")
        p.add_argument("--key", required=True, help="PEM private key (herd eval keygen makes one)")
        p.add_argument("--out", default=None, help="default: overwrite the report")
    elif which == "contamination":
        p.description = "n-gram overlap with a corpus (13 words by default), and Min-K% / Min-K%++ under the model, per item"
        p.add_argument("source", nargs="?", default=None, help="the model (default smollm2-135m)")
        p.add_argument("--task", required=True, help="mc, mc-arithmetic or gsm8k")
        p.add_argument("--data", default=None)
        p.add_argument("--corpus", default=None, help="a text file or a directory of them (streamed)")
        p.add_argument("--limit", type=positive_int, default=None)
        p.add_argument("--top", type=positive_int, default=20, help="rows shown (default 20)")
        p.add_argument("--ngram", type=positive_int, default=13)
        p.add_argument("--k", type=float, default=0.2, help="the fraction of least likely tokens (default 0.2)")
        p.add_argument("--out", default=None, help="write every item's numbers as JSON")
        add_model_options(p)
    elif which == "keygen":
        p.description = "write a new Ed25519 key pair: KEY (private, mode 600) and KEY.pub"
        p.add_argument("key")
    return p


def parse_command(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    if argv and argv[0] in SUBCOMMANDS:
        args = _subparser(argv[0]).parse_intermixed_args(argv[1:])
        args.sub = argv[0]
        return args
    args = parser.parse_intermixed_args(argv)
    args.sub = None
    return args


def task_path(text: str) -> tuple[str, str]:
    """argparse type: "TASK=PATH" -> (task, path)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not TASK=PATH")
    return name, path


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0")
    return value


def number_list(kind):
    """argparse type: "1,2,4" -> [1, 2, 4]."""
    def parse(text: str) -> list:
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                             f"{'whole numbers' if kind is int else 'numbers'}") from None
        if not values:
            raise argparse.ArgumentTypeError("the list is empty")
        return values

    return parse


def main(args):
    if args.sub is not None:
        return globals()[f"_{args.sub}"](args)
    from herd.eval.report import format_score, save
    from herd.eval.run import backend_for, run_tasks
    from herd.eval.tasks import make_task

    if args.server and args.source:
        print("herd eval: give a SOURCE or --server, not both", file=sys.stderr)
        return 2
    specs = args.task or ([] if args.lm_eval else ["mc-arithmetic"])
    options = dict(seed=args.seed, limit=args.limit, context=args.context, shots=args.shots, train=args.train,
                   chat=args.chat, max_tokens=args.max_tokens, self_consistency=args.self_consistency,
                   sc_temperature=args.sc_temperature, lengths=args.lengths,
                   depths=args.depths, needles=args.needles, filler=args.filler, steps=args.steps)
    tasks = []
    for spec in specs:
        name, _, data = spec.partition("=")
        tasks.append(make_task(name, data=data or args.data, **options))
    if args.server:
        backend = backend_for(server=args.server, batch_size=args.batch_size, api_key=args.api_key,
                              served_model=args.model)
        source = args.server
    else:
        from herd.eval.backends import EngineBackend

        llm = load_with_progress(args.source, args.device, args.dtype, **model_options(args))
        backend, source = EngineBackend(llm, args.batch_size, args.scoring), args.source or "smollm2-135m"
    settings = {"batch_size": args.batch_size, "dtype": args.dtype, "device": args.device, "scoring": args.scoring,
                **{k: v for k, v in options.items() if v is not None}}
    report = run_tasks(backend, tasks, args.seed, source=source, progress=sys.stderr.isatty(), settings=settings)
    if args.lm_eval:
        if args.server:
            print("herd eval: --lm-eval runs in-process (use lm-eval's own local-completions for a server)",
                  file=sys.stderr)
            return 2
        from herd.eval.lm_eval_adapter import report_tasks, run_lm_eval

        results = run_lm_eval(backend.llm, args.lm_eval.split(","), limit=args.limit, batch_size=args.batch_size,
                              seed=args.seed, include_path=args.lm_eval_include, num_fewshot=args.shots)
        report["tasks"] += report_tasks(results)
    if args.name:
        report["model"]["name"] = args.name
    for task in report["tasks"]:
        for metric, s in sorted(task["metrics"].items()):
            name = task["definition"]["task"]
            print(f"{name:<16} {metric:<16} {format_score(s['value'], s['stderr'])}  (n={s['n']})")
        for title, table in task.get("tables", {}).items():
            print(f"{task['definition']['task']}: {title}\n{table['text'] if isinstance(table, dict) else table}")
    m = report["model"]
    print(f"model: {m.get('name')}  fingerprint: {m.get('fingerprint') or 'unknown (scored through a server)'}")
    if args.out:
        from herd.eval.plots import write_plots

        save(report, args.out)
        print(f"report: {args.out}")
        for path in write_plots(report, args.out):
            print(f"plot: {path}")
    if args.html:
        from herd.eval.html import write_html

        write_html(report, args.html)
        print(f"html: {args.html}")
    return 0


def _load_backend(args, report):
    from herd.eval.backends import EngineBackend
    from herd.eval.run import backend_for

    runtime, settings = report.get("runtime") or {}, report.get("settings") or {}
    batch = args.batch_size or runtime.get("batch_size") or 16
    if args.server:
        return backend_for(server=args.server, batch_size=batch, api_key=args.api_key, served_model=args.model)
    # the report's load options unless overridden: float32 on a quantized file is another arithmetic path
    dtype = args.dtype or (settings.get("dtype") if isinstance(settings.get("dtype"), str) else None)
    if dtype is None and runtime.get("weights_quantized") is False and runtime.get("dtype") == "float32":
        dtype = "float32"  # scored on the dequantized float32 path (a quantized file loads quantized by default)
    llm = load_with_progress(args.source, args.device, dtype, **model_options(args))
    scoring = runtime.get("scoring", "batched")
    if scoring not in ("batched", "engine"):
        from herd.eval.report import ReportError

        raise ReportError(f"{args.report}: runtime.scoring is {scoring!r}, not 'batched' or 'engine'")
    return EngineBackend(llm, batch, scoring)


def _verify(args):
    from herd.eval.report import load
    from herd.eval.verify import verify

    report = load(args.report)  # a malformed report or key is refused before the model loads
    if args.public_key is not None:
        from herd.eval.signing import load_public_key

        load_public_key(args.public_key)
    backend = _load_backend(args, report)
    v = verify(report, backend, sample=None if args.full else args.sample, seed=args.seed,
               tolerance=args.tolerance, public_key=args.public_key, data=dict(args.data), source=args.source)
    for line in v.checked:
        print(f"ok    {line}")
    for line in v.unverified:
        print(f"NOT CHECKED  {line}")
    for line in v.findings:
        print(f"FAIL  {line}")
    if v.findings:
        print(f"the report does NOT hold ({len(v.findings)} findings)")
        return 1
    if v.unverified:
        print(f"the report is NOT verified ({len(v.unverified)} things could not be checked)")
        return 3
    print("the report holds for these weights")
    return 0


def _compare(args):
    from herd.eval.compare import compare
    from herd.eval.report import load

    print(compare([load(p) for p in args.reports], args.allow_different_models, args.allow_different_tasks).text())
    return 0


def _sign(args):
    from herd.eval.report import load, save
    from herd.eval.signing import sign

    signed = sign(load(args.report), args.key)
    save(signed, args.out or args.report)
    print(f"signed {args.out or args.report} with key {signed['signature']['key_id']}")
    return 0


def _keygen(args):
    from herd.eval.signing import generate_key

    private, public = generate_key(args.key)
    print(f"private key: {private} (keep it)\npublic key: {public} (publish it)")
    return 0


def _contamination(args):
    import json
    from dataclasses import asdict

    from herd.eval.contamination import contamination, table
    from herd.eval.tasks import make_task

    task = make_task(args.task, data=args.data, limit=args.limit)
    llm = load_with_progress(args.source, args.device, args.dtype, **model_options(args))
    rows = contamination(llm, task, args.corpus, args.ngram, args.k)
    print(table(rows, args.top, args.ngram, corpus=args.corpus is not None))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"task": task.definition(), "corpus": args.corpus, "ngram": args.ngram, "k": args.k,
                       "model_fingerprint": llm.fingerprint, "items": [asdict(r) for r in rows]}, f, indent=1)
    return 0
