"""Serving benchmark: aggregate tokens/s and time to first token at 1, 4 and 16 concurrent clients.

    .venv/bin/python benchmarks/serve.py [SOURCE] [--levels 1,4,16] [--max-tokens 32] [--requests 2]

Starts `herd serve` as its own process on a loopback port (so the clients do not share its GIL), then
for each level runs that many streaming chat clients, each sending `--requests` requests one after
another with different prompts. Tokens are counted from the server's usage; TTFT is from sending the
request to the first content chunk. Ignore-EOS is not available over the API, so replies may stop
early; the tokens actually generated are what is counted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Write a short story about a robot learning to paint.", "Explain how rainbows form.",
           "List ten animals and one fact about each.", "Describe a day in the life of a baker.",
           "What are the planets of the solar system? Describe each.", "Write a poem about the sea.",
           "Give me a recipe for pancakes.", "Explain the rules of chess."]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_level(client, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    ttfts, tokens, lock = [], [], threading.Lock()

    def worker(w: int):
        for r in range(requests):
            prompt = PROMPTS[(w * requests + r) % len(PROMPTS)]
            start = time.perf_counter()
            first = None
            used = 0
            stream = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                temperature=0.7, seed=w * 100 + r, stream=True, stream_options={"include_usage": True})
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - start
                if chunk.usage is not None:
                    used = chunk.usage.completion_tokens
            with lock:
                ttfts.append(first if first is not None else time.perf_counter() - start)
                tokens.append(used)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts.sort()
    return {"clients": clients, "requests": len(tokens), "tokens": sum(tokens), "seconds": wall,
            "tok_s": sum(tokens) / wall, "ttft_median": statistics.median(ttfts),
            "ttft_p90": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", default="smollm2-135m")
    p.add_argument("--levels", default="1,4,16")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)

    import openai

    port = free_port()
    cmd = [sys.executable, "-m", "herd", "serve", args.source, "--port", str(port), "--max-batch",
           str(args.max_batch), "--context", str(args.context)] + (["--dtype", args.dtype] if args.dtype else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            if server.poll() is not None:
                print(server.stderr.read(), file=sys.stderr)
                return 1
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        run_level(client, model, 1, 1, 4)  # warm-up
        print(f"herd serve {args.source} (max-batch {args.max_batch}, {args.max_tokens} tokens per request, "
              f"{os.cpu_count()} CPUs)")
        print(f"{'clients':>7} {'requests':>8} {'tokens':>7} {'seconds':>8} {'tok/s':>7} {'TTFT med':>9} "
              f"{'TTFT p90':>9}")
        for level in [int(x) for x in args.levels.split(",")]:
            r = run_level(client, model, level, args.requests, args.max_tokens)
            print(f"{r['clients']:>7} {r['requests']:>8} {r['tokens']:>7} {r['seconds']:>8.1f} {r['tok_s']:>7.1f} "
                  f"{r['ttft_median']:>8.2f}s {r['ttft_p90']:>8.2f}s", flush=True)
    finally:
        server.terminate()
        server.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
