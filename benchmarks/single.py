"""One request at a time: herd's decode and prefill against llama.cpp's own, same GGUF, same threads, same run.

    .venv/bin/python benchmarks/single.py [SOURCE] [--prompt 512] [--decode 128] [--runs 5] [--threads N]

llama.cpp's figures are the ones llama-server measures itself (the `timings` of a /completion reply:
prompt_per_second and predicted_per_second, inside the server, no HTTP in them), with the prompt cache
off so every prefill is computed. herd's are measured the same way inside herd's engine (the runner
every path uses, its prefix cache off too): prefill is a `--prompt`-token request's time to its first token, decode is the rate of
the next `--decode` tokens of a short prompt. Both ignore end-of-sequence tokens and decode greedily; the
prompt is the same token ids for both. Each run alternates which engine goes first; medians are quoted.
herd is measured twice: as it loads by default, and with prompt_int8=True (int8 activations for prompts on q4
weights, llama.cpp's arithmetic; herd/transforms/prompt_int8.py). Also: herd's load time (herd.load, cold layout cache and cached), the first figure a user feels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serve import server  # noqa: E402
from herd.runtime import physical_cores  # noqa: E402

HERD_WORKER = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
t = time.perf_counter()
import herd
from herd.engine import Engine, Request
from herd.sampling import SamplingParams
llm = herd.load(spec["path"], threads=spec["threads"], prompt_int8=spec["prompt_int8"])
load_s = time.perf_counter() - t
engine = Engine(llm.model, llm.tokenizer, max_batch=1, context=spec["prompt"] + spec["decode"] + 64,
                prefill_budget=spec["prompt"], prefix_caching=False)  # as llama-server's cache_prompt=false
def run(ids, n):
    engine.add_request(Request(str(time.perf_counter()), ids, n, SamplingParams(temperature=0), frozenset()))
    start, times = time.perf_counter(), []
    while engine.has_work():
        for o in engine.step():
            times += [time.perf_counter()] * len(o.token_ids)
    return start, times
run(spec["ids"][:16], 4)  # warm up
out = {"load_s": load_s, "prefill": [], "decode": []}
for _ in range(spec["runs"]):
    start, times = run(spec["ids"][: spec["prompt"]], 1)
    out["prefill"].append(spec["prompt"] / (times[0] - start))
    start, times = run(spec["ids"][:16], spec["decode"] + 1)
    out["decode"].append(spec["decode"] / (times[-1] - times[0]))
print("HERD-SINGLE " + json.dumps(out))
"""


def herd_figures(path: str, ids: list[int], args, prompt_int8: bool = False) -> dict:
    spec = dict(path=path, ids=ids, prompt=args.prompt, decode=args.decode, runs=1, threads=args.threads,
                prompt_int8=prompt_int8)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", HERD_WORKER, json.dumps(spec)], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    line = next((l for l in out.stdout.splitlines() if l.startswith("HERD-SINGLE ")), None)
    if line is None:
        raise RuntimeError(f"herd worker failed:\n{out.stderr[-3000:]}")
    r = json.loads(line[len("HERD-SINGLE "):])
    return {"load_s": r["load_s"], "prefill": r["prefill"][0], "decode": r["decode"][0]}


def llama_figures(url: str, ids: list[int], args) -> dict:
    def completion(prompt: list[int], n: int) -> dict:
        body = dict(prompt=prompt, n_predict=n, temperature=0, ignore_eos=True, cache_prompt=False, samplers=[],
                    top_k=1)
        req = urllib.request.Request(url + "/completion", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())["timings"]

    completion(ids[:16], 4)  # warm up
    prefill = completion(ids[: args.prompt], 1)["prompt_per_second"]
    decode = completion(ids[:16], args.decode + 1)["predicted_per_second"]
    return {"prefill": prefill, "decode": decode}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", nargs="?", default="smollm2-135m", help="GGUF file or alias")
    p.add_argument("--prompt", type=int, default=512, help="prefill prompt tokens")
    p.add_argument("--decode", type=int, default=128, help="decoded tokens")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=physical_cores())
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from herd.formats import open_checkpoint
    from herd.models import resolve
    from herd.tokenizer import load_tokenizer

    path = resolve(args.source)
    tok = load_tokenizer(open_checkpoint(path).tokenizer)
    text = open(ROOT / "tests" / "data" / "tinyshakespeare-40k.txt", encoding="utf-8").read()
    ids = tok.encode(text)[: args.prompt + 16]
    if len(ids) < args.prompt:
        raise SystemExit(f"the sample text has only {len(ids)} tokens")
    server_args = argparse.Namespace(context=args.prompt + args.decode + 64, slots=1, threads=args.threads,
                                     device="cpu", dtype=None)
    runs = {"herd": [], "llama.cpp": [], "herd int8": []}
    with tempfile.TemporaryDirectory() as logs:
        for run in range(args.runs):
            order = list(runs) if run % 2 == 0 else list(runs)[::-1]
            for engine in order:
                if engine.startswith("herd"):
                    runs[engine].append(herd_figures(str(path), ids, args, prompt_int8=engine == "herd int8"))
                else:
                    with server("llama.cpp", Path(path), server_args, Path(logs)) as (url, _):
                        runs["llama.cpp"].append(llama_figures(url, ids, args))
                print(f"run {run + 1}/{args.runs} {engine:9s} " + ", ".join(f"{k} {v:.2f}" for k, v in runs[engine][-1].items()),
                      flush=True)
    med = {e: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for e, rs in runs.items()}
    h, l = med["herd"], med["llama.cpp"]
    print(f"\n{Path(path).name}, {args.threads} threads, medians of {args.runs} runs (ratio = herd / llama.cpp, > 1 is herd faster)")
    print(f"  decode   herd {h['decode']:7.1f} tok/s   llama.cpp {l['decode']:7.1f} tok/s   ratio {h['decode'] / l['decode']:.2f}")
    print(f"  prefill  herd {h['prefill']:7.1f} tok/s   llama.cpp {l['prefill']:7.1f} tok/s   ratio {h['prefill'] / l['prefill']:.2f}"
          f"   ({args.prompt}-token prompt)")
    i8 = med["herd int8"]
    print(f"  prefill  herd, prompt_int8=True (int8 activations, as llama.cpp) {i8['prefill']:7.1f} tok/s   "
          f"ratio {i8['prefill'] / l['prefill']:.2f}")
    print(f"  herd load {h['load_s']:.2f} s (import herd and herd.load, median; the first load of a file also repacks it)")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "medians": med}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
