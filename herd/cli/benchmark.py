"""`herd bench`: herd against llama.cpp and HF transformers on the same GGUF file, threads and tokens.

Every measurement is a fresh process (herd/cli/benchmark_worker.py), so load time and peak RSS are honest;
engines take turns run after run, so a noisy neighbour costs each about the same; the table shows
medians and the ratios herd / peer. llama-cpp-python (and transformers, when this environment lacks
it) are installed into a separate virtual environment, never into herd's own.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import venv
from pathlib import Path

LLAMA_CPP = "llama-cpp-python==0.3.36"
HF = ["transformers==5.23.0", "accelerate>=1.0", "gguf==0.19.0", "sentencepiece", "protobuf"]
WORKER = Path(__file__).with_name("benchmark_worker.py")
METRICS = [  # key, label, format, higher is better
    ("decode_tps", "decode tok/s", "{:.1f}", True),
    ("prefill_tps", "prefill tok/s", "{:.1f}", True),
    ("first_token_s", "load→first token s", "{:.2f}", False),
    ("start_first_token_s", "start→first token s", "{:.2f}", False),
    ("load_s", "load s", "{:.2f}", False),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}", False),
]
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
        "it was the season of Darkness, it was the spring of hope, it was the winter of despair. ")


def peers_venv() -> Path:
    """Where the peers live: $HERD_BENCH_VENV, else benchmarks/.venv-peers in a checkout, else the cache."""
    if os.environ.get("HERD_BENCH_VENV"):
        return Path(os.environ["HERD_BENCH_VENV"])
    checkout = Path(__file__).resolve().parents[1] / "benchmarks"
    if checkout.is_dir():
        return checkout / ".venv-peers"
    return Path.home() / ".cache" / "herd" / "bench-peers"


def _python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _has(python: Path | str, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([str(python), "-c", code], capture_output=True).returncode == 0


def ensure_peer(engine: str, log=print) -> str:
    """The python that runs `engine`, installing it into the peers venv first if needed."""
    if engine == "herd":
        return sys.executable
    if engine == "hf" and _has(sys.executable, "transformers") and _has(sys.executable, "gguf"):
        return sys.executable  # herd's dev environment already has the reference stack
    env = peers_venv()
    python = _python(env)
    if not python.exists():
        log(f"creating {env}")
        venv.create(env, with_pip=True)
    module, packages = ("llama_cpp", [LLAMA_CPP]) if engine == "llama.cpp" else ("transformers", HF + ["torch"])
    if not _has(python, module):
        log(f"installing {' '.join(packages)} into {env} (llama-cpp-python builds from source: minutes)")
        subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *packages], check=True)
    return str(python)


def token_ids(path: Path, n_long: int) -> tuple[list[int], list[int]]:
    import herd.formats
    from herd.tokenizer import load_tokenizer

    tok = load_tokenizer(herd.formats.open_checkpoint(path).tokenizer)
    ids = tok.encode(TEXT * (n_long // 40 + 2))
    return ids[:16], ids[:n_long]


def measure(engine: str, python: str, spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([python, str(WORKER), engine, json.dumps(spec)], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("HERD-BENCH "):
            return json.loads(line[len("HERD-BENCH "):])
    raise RuntimeError(f"{engine} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def run(source, engines=("herd", "llama.cpp", "hf"), runs: int = 3, threads: int | None = None,
        decode_tokens: int = 128, prompt_tokens: int = 512, herd_options: dict | None = None, log=print) -> dict:
    from herd.models import resolve
    from herd.runtime import physical_cores

    path = resolve(source)
    threads = threads or physical_cores()
    short, long_ids = token_ids(path, prompt_tokens)
    spec = dict(path=str(path), threads=threads, short=short, long=long_ids, decode=decode_tokens,
                herd_options=herd_options or {})
    pythons = {e: ensure_peer(e, log) for e in engines}
    results: dict[str, list[dict]] = {e: [] for e in engines}
    for i in range(runs):
        for e in engines:
            started = time.perf_counter()
            r = measure(e, pythons[e], spec)
            results[e].append(r)
            log(f"run {i + 1}/{runs} {e:<9} decode {r['decode_tps']:6.1f} tok/s  prefill {r['prefill_tps']:6.1f} tok/s  "
                f"first token {r['first_token_s']:5.2f} s  RSS {r['peak_rss_mb']:4.0f} MB  ({time.perf_counter() - started:.0f} s)")
    medians = {e: {k: statistics.median(r[k] for r in rs) for k, *_ in METRICS} for e, rs in results.items()}
    return dict(path=str(path), threads=threads, runs=runs, prompt_tokens=len(long_ids), decode_tokens=decode_tokens,
                results=results, medians=medians, details={e: rs[0].get("detail", "") for e, rs in results.items()})


def table(report: dict) -> str:
    engines = list(report["medians"])
    peers = [e for e in engines if e != "herd"]
    head = ["metric (median of %d)" % report["runs"], *engines, *(f"herd/{p}" for p in peers if "herd" in engines)]
    rows = [head]
    for key, label, fmt, _ in METRICS:
        m = [report["medians"][e][key] for e in engines]
        ratios = [f"{report['medians']['herd'][key] / report['medians'][p][key]:.2f}x" for p in peers
                  if "herd" in engines]
        rows.append([label, *(fmt.format(v) for v in m), *ratios])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    info = [f"{report['path']}, {report['threads']} threads, prompt {report['prompt_tokens']} tokens, "
            f"{report['decode_tokens']} greedy tokens"] + [f"{e}: {d}" for e, d in report["details"].items()]
    return "\n".join(info + [""] + lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="benchmarks/decode.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


ENGINES = ("herd", "llama.cpp", "hf")


def engine_list(text: str) -> list[str]:
    """argparse type for --engines: a comma-separated subset of ENGINES, checked before anything installs."""
    import argparse

    engines = [e.strip() for e in text.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(ENGINES)} (comma-separated)")
    return list(dict.fromkeys(engines))


def add_arguments(parser) -> None:
    from herd.cli import positive_int, thread_count

    parser.add_argument("source", nargs="?", default=None, help="GGUF file or alias (default smollm2-135m)")
    parser.add_argument("--engines", type=engine_list, default=list(ENGINES), help="comma-separated: herd, llama.cpp, hf")
    parser.add_argument("--runs", type=positive_int, default=3)
    parser.add_argument("--threads", type=thread_count, default=None, help="default: physical cores")
    parser.add_argument("--decode-tokens", type=positive_int, default=128)
    parser.add_argument("--prompt-tokens", type=positive_int, default=512)
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="herd's decode-step compile")
    parser.add_argument("--json", default=None, help="also write every measurement to this file")


def run_cli(args) -> int:
    compile_ = {"auto": None, "on": True, "off": False}[args.compile]
    options = {} if compile_ is None else {"compile": compile_}
    report = run(args.source, args.engines, args.runs, args.threads,
                 args.decode_tokens, args.prompt_tokens, options, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0
