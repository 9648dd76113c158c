"""Serving benchmark: herd serve against llama.cpp's llama-server, tokens/s and time to first token.

    .venv/bin/python benchmarks/serve.py [SOURCE] [--peers llama.cpp|none] [--levels 1,4,16]
                                         [--max-tokens 64] [--requests 2] [--runs 1] [--json PATH]

SOURCE is a GGUF file or an alias herd knows (default smollm2-135m); llama-server is given the same
file. Each server runs as its own process on a loopback port (so the clients do not share its GIL), one
server at a time, with the same slots (16), context per slot and threads. With --runs N the servers take
turns run after run, alternating which goes first, so a noisy neighbour costs each about the same, and
the tables quote medians. Every run has two parts:

* load: at each level, that many streaming chat clients each send --requests requests one after another
  (different prompts, temperature 0, the same --max-tokens). Tokens are the completion_tokens of the
  usage chunk both servers send for `stream_options.include_usage`; tok/s is all of them over the wall
  time of the level. TTFT is from sending a request to its first non-empty content delta.
* prefix reuse: a chat with a ~1,500-token system prompt and some history is sent once, then the same
  conversation with a different final user message; the TTFT of the second shows what the server kept
  of the first (llama-server's cache_prompt is on by default).

Ignore-EOS is not in the OpenAI API, so replies may stop early and the servers need not generate the
same number of tokens; the tokens column says how many each did.

llama-server comes from benchmarks/llamacpp.py (built once from the llama-cpp-python sdist, cached).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPTS = ["Write a short story about a robot learning to paint.", "Explain how rainbows form.",
           "List ten animals and one fact about each.", "Describe a day in the life of a baker.",
           "What are the planets of the solar system? Describe each.", "Write a poem about the sea.",
           "Give me a recipe for pancakes.", "Explain the rules of chess."]
ENGINES = {"herd": "herd", "llama.cpp": "llama-server"}  # engine -> column label

# The shared prefix of the prefix-reuse test: a long, plain system prompt (about 1,300 tokens with the
# Llama 3 and SmolLM2 tokenizers) and a few turns of history, so the conversation is ~1,500 tokens before
# its last user message.
SYSTEM = ("You are the support assistant of a small bakery. Follow the house rules below in every answer.\n" +
          "".join(f"Rule {i}: when a customer asks about {topic}, answer politely, mention the opening hours "
                  f"(seven to seven, closed on Mondays), keep it under five sentences and never invent prices "
                  f"that are not on the menu.\n"
                  for i, topic in enumerate(["bread", "cakes", "pastries", "allergens", "delivery", "orders",
                                             "catering", "gift cards", "opening hours", "parking", "coffee",
                                             "tea", "sandwiches", "soup", "seasonal specials", "refunds",
                                             "complaints", "jobs", "wholesale", "events", "gluten-free bread",
                                             "vegan cakes", "birthday cakes", "wedding cakes", "cookies",
                                             "muffins", "croissants", "baguettes", "sourdough"], 1)))
HISTORY = [("I would like to order a birthday cake for Saturday.",
            "Of course! We are open from seven to seven, closed on Mondays. What flavour would you like?"),
           ("Chocolate, with a raspberry filling, for about twelve people.",
            "A chocolate cake with raspberry filling for twelve sounds lovely. Should we write a message on it?"),
           ("Yes, please write 'Happy birthday, Anna'.",
            "Noted: 'Happy birthday, Anna'. You can collect it on Saturday any time after nine.")]
PREFIX_FIRST = "Can I also get candles?"
PREFIX_SECOND = "Do you have a gluten-free option?"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(engine: str, gguf: Path, args, log_dir: Path):
    """A started server (its base URL), stopped on exit. Its log goes to a file, not a pipe: a pipe nobody
    reads fills up and stalls a chatty server mid-benchmark."""
    port = free_port()
    ctx = args.context
    if engine == "herd":
        cmd = [sys.executable, "-m", "herd", "serve", str(gguf), "--port", str(port), "--max-batch", str(args.slots),
               "--context", str(ctx), "--threads", str(args.threads), "--device", args.device,
               "--log-level", "warning"] + (["--dtype", args.dtype] if args.dtype else [])
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    else:
        from benchmarks.llamacpp import ensure

        # -c is the whole KV cache, split evenly over the -np slots (not unified when -np is explicit),
        # so each slot gets the same context herd's --context gives a sequence.
        cmd = [str(ensure().server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "-np", str(args.slots), "-c", str(args.slots * ctx), "-t", str(args.threads)]
        env = dict(os.environ)
    log_path = log_dir / f"{engine}-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{engine} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                # llama-server answers 503 while it loads, which urllib raises (HTTPError is an OSError).
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{engine} not healthy after 600 s; log: {log_path}")
                time.sleep(0.2)
        yield url, cmd
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stream_chat(client, model: str, messages: list, max_tokens: int) -> dict:
    """One streaming chat request: TTFT, completion tokens from the usage chunk, and what the server says
    about cached prompt tokens (llama-server: timings.cache_n; OpenAI style: prompt_tokens_details)."""
    start = time.perf_counter()
    first = None
    usage = timings = None
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            usage = chunk.usage
        extra = chunk.model_extra or {}
        if extra.get("timings"):
            timings = extra["timings"]
    total = time.perf_counter() - start
    if usage is None:
        raise RuntimeError("the server sent no usage chunk although stream_options.include_usage was set")
    details = getattr(usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) if details is not None else None
    if cached is None and timings:
        cached = timings.get("cache_n")
    return {"ttft": first if first is not None else total, "seconds": total, "tokens": usage.completion_tokens,
            "prompt_tokens": usage.prompt_tokens, "cached_tokens": cached}


def run_level(client, model: str, clients: int, requests: int, max_tokens: int, unique: bool = True) -> dict:
    """`unique`: every request's message starts with its own tag, so no request finds another's prompt in a
    prefix cache (only the chat template's common start, as in real traffic); the prefix test measures reuse."""
    results, lock = [], threading.Lock()
    errors = []
    salt = random.randrange(10**6)

    def worker(w: int):
        try:
            for r in range(requests):
                prompt = PROMPTS[(w * requests + r) % len(PROMPTS)]
                if unique:
                    prompt = f"(request {salt}-{clients}-{w}-{r}) {prompt}"
                out = stream_chat(client, model, [{"role": "user", "content": prompt}], max_tokens)
                with lock:
                    results.append(out)
        except Exception as e:  # noqa: BLE001 - reported below, after the other clients finish
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "seconds": wall, "tok_s": tokens / wall,
            "ttft_median": statistics.median(ttfts), "ttft_p90": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))]}


def prefix_reuse(client, model: str) -> dict:
    history = [{"role": "system", "content": SYSTEM}]
    for user, assistant in HISTORY:
        history += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    first = stream_chat(client, model, history + [{"role": "user", "content": PREFIX_FIRST}], 8)
    again = stream_chat(client, model, history + [{"role": "user", "content": PREFIX_SECOND}], 8)
    return {"prompt_tokens": first["prompt_tokens"], "first_ttft": first["ttft"], "repeat_ttft": again["ttft"],
            "ratio": first["ttft"] / again["ttft"], "repeat_cached_tokens": again["cached_tokens"]}


def measure(engine: str, gguf: Path, args, log_dir: Path) -> dict:
    import openai

    with server(engine, gguf, args, log_dir) as (url, cmd):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        run_level(client, model, 1, 1, 4)  # warm-up: first-call allocations and compilation are not load
        levels = {}
        for level in args.levels:
            levels[level] = r = run_level(client, model, level, args.requests, args.max_tokens,
                                          unique=not args.shared_prompts)
            print(f"  {engine:<9} {level:>2} clients: {r['tokens']:>5} tokens in {r['seconds']:6.1f} s = "
                  f"{r['tok_s']:6.1f} tok/s, TTFT median {r['ttft_median']:.2f} s", flush=True)
        prefix = prefix_reuse(client, model) if args.prefix else None
        if prefix:
            print(f"  {engine:<9} prefix {prefix['prompt_tokens']} tokens: first TTFT {prefix['first_ttft']:.2f} s, "
                  f"repeated {prefix['repeat_ttft']:.2f} s (cached tokens reported: {prefix['repeat_cached_tokens']})",
                  flush=True)
    return {"cmd": [str(c) for c in cmd], "levels": levels, "prefix": prefix}


def median_of(runs: list[dict], *keys):
    values = []
    for r in runs:
        for k in keys:
            r = r[k]
        values.append(r)
    return statistics.median(values)


def summarize(results: dict[str, list[dict]], args) -> dict:
    out = {"levels": {}, "prefix": {}}
    for e, runs in results.items():
        for level in args.levels:
            row = out["levels"].setdefault(level, {})
            row[e] = {k: median_of(runs, "levels", level, k) for k in ("tok_s", "ttft_median", "tokens")}
        if args.prefix:
            out["prefix"][e] = {k: median_of(runs, "prefix", k)
                                for k in ("prompt_tokens", "first_ttft", "repeat_ttft", "ratio")}
    return out


def print_tables(summary: dict, engines: list[str], args) -> None:
    peers = [e for e in engines if e != "herd"]
    print(f"\nmedians of {args.runs} run(s); {args.slots} slots, {args.threads} threads, {args.max_tokens} tokens "
          f"per request, {args.requests} request(s) per client; ratio = herd / peer (tok/s: > 1 is herd faster)")
    head = ["clients"] + [f"{ENGINES[e]} tok/s" for e in engines] + [f"ratio vs {ENGINES[p]}" for p in peers]
    head += [f"{ENGINES[e]} TTFT" for e in engines] + [f"{ENGINES[e]} tokens" for e in engines]
    rows = [head]
    for level, row in summary["levels"].items():
        cells = [str(level)] + [f"{row[e]['tok_s']:.1f}" for e in engines]
        cells += [f"{row['herd']['tok_s'] / row[p]['tok_s']:.2f}" for p in peers]
        cells += [f"{row[e]['ttft_median']:.2f} s" for e in engines] + [f"{row[e]['tokens']:.0f}" for e in engines]
        rows.append(cells)
    _print_rows(rows)
    if summary["prefix"]:
        some = next(iter(summary["prefix"].values()))
        print(f"\nprefix reuse: TTFT of a {some['prompt_tokens']:.0f}-token chat, first time and with the prefix "
              f"already served (ratio = first / repeated: > 1 means the prefix was reused)")
        rows = [["server", "first TTFT", "repeated TTFT", "ratio"]]
        for e, p in summary["prefix"].items():
            rows.append([ENGINES[e], f"{p['first_ttft']:.3f} s", f"{p['repeat_ttft']:.3f} s", f"{p['ratio']:.2f}"])
        _print_rows(rows)


def _print_rows(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def main(argv=None) -> int:
    from herd.runtime import physical_cores

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", default="smollm2-135m", help="GGUF file or alias")
    p.add_argument("--peers", default="llama.cpp", help="comma list of servers besides herd: llama.cpp, or none")
    p.add_argument("--levels", default="1,4,16", help="concurrent clients, comma separated")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    p.add_argument("--runs", type=int, default=1, help="runs per server, interleaved; tables show medians")
    p.add_argument("--slots", type=int, default=16, help="herd --max-batch, llama-server -np")
    p.add_argument("--context", type=int, default=2048, help="tokens per slot (llama-server -c is slots x this)")
    p.add_argument("--threads", type=int, default=physical_cores(), help="herd --threads, llama-server -t")
    p.add_argument("--device", default="cpu", help="herd --device (llama-server is built for the CPU)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="herd --dtype")
    p.add_argument("--shared-prompts", action="store_true",
                   help="the same 8 prompts at every level (later levels then find earlier ones in a prefix cache)")
    p.add_argument("--no-prefix", dest="prefix", action="store_false", help="skip the prefix-reuse test")
    p.add_argument("--json", type=Path, help="write every measurement here")
    args = p.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",")]
    peers = [] if args.peers in ("", "none") else args.peers.split(",")
    unknown = [x for x in peers if x not in ENGINES or x == "herd"]
    if unknown:
        p.error(f"unknown peer(s) {unknown}; known: llama.cpp")
    engines = ["herd", *peers]

    from herd.models import resolve

    gguf = Path(resolve(args.source))
    if peers and gguf.suffix != ".gguf":
        p.error(f"{gguf} is not a GGUF file, which llama-server needs; pass --peers none to measure herd alone")
    if "llama.cpp" in peers:
        from benchmarks.llamacpp import ensure

        ensure()  # build before timing anything, not in the middle of run 1
    print(f"{gguf.name}: {', '.join(ENGINES[e] for e in engines)}; {os.cpu_count()} CPUs, {args.runs} run(s)")
    results: dict[str, list[dict]] = {e: [] for e in engines}
    with tempfile.TemporaryDirectory(prefix="herd-serve-bench-") as logs:
        for i in range(args.runs):
            order = engines if i % 2 == 0 else engines[::-1]
            print(f"run {i + 1}/{args.runs}", flush=True)
            for e in order:
                results[e].append(measure(e, gguf, args, Path(logs)))
    summary = summarize(results, args)
    print_tables(summary, engines, args)
    if args.json:
        report = {"model": str(gguf), "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version},
                  "runs": results, "medians": summary}
        args.json.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
