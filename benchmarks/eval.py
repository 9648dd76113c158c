"""Evaluation benchmark: herd eval against lm-evaluation-harness's HF backend (`--model hf`) on the same
GGUF, in the same run: wall time and the scores of a multiple-choice task and a perplexity task.

    .venv/bin/python benchmarks/eval.py [SOURCE] [--items 100] [--context 512] [--runs 3] [--batch-size 16]
                                        [--json PATH]

SOURCE is a GGUF file or an alias herd knows (default smollm2-135m). lm-eval's HFLM loads the same file
through transformers' GGUF reader (dequantized to float32) with the same batch size. Both are handed the
same requests: the (context, continuation) pairs of herd's built-in `mc-arithmetic` task (4 choices per
item, lm-eval's pair encoding on both sides) and the built-in Shakespeare text as one
`loglikelihood_rolling` document with windows of --context tokens; accuracy comes from the same argmax
over each side's log-likelihoods. herd runs on its default CPU path (quantized weights kept quantized,
bf16 activations) and on the float32 path. Runs alternate which side goes first; times are medians.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def mc_pairs(task):
    from herd.eval.tasks.multiple_choice import continuation_for

    items = task.items()
    pairs = [(i.data["context"], continuation_for(i.data["context"], c)) for i in items for c in i.data["choices"]]
    return items, pairs


def accuracy(items, lls) -> float:
    right, k = 0, 0
    for item in items:
        n = len(item.data["choices"])
        mine = lls[k:k + n]
        k += n
        right += max(range(n), key=lambda j: (mine[j], -j)) == item.data["label"]
    return right / len(items)


def run_herd(llm, items, pairs, text, context, batch_size):
    from herd.eval.lm_eval_adapter import HerdLM
    from lm_eval.api.instance import Instance

    lm = HerdLM(llm, batch_size=batch_size, max_length=context)
    t = time.perf_counter()
    lls = [ll for ll, _ in lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])]
    mc_s = time.perf_counter() - t
    t = time.perf_counter()
    rolled = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    return {"mc_seconds": mc_s, "acc": accuracy(items, lls), "ppl_seconds": time.perf_counter() - t,
            "bits_per_byte": -rolled / len(text.encode()) / math.log(2), "lls": lls}


def run_hf(hf, items, pairs, text):
    from lm_eval.api.instance import Instance

    t = time.perf_counter()
    lls = [ll for ll, _ in hf.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)],
                                            disable_tqdm=True)]
    mc_s = time.perf_counter() - t
    t = time.perf_counter()
    rolled = hf.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)[0]
    return {"mc_seconds": mc_s, "acc": accuracy(items, lls), "ppl_seconds": time.perf_counter() - t,
            "bits_per_byte": -rolled / len(text.encode()) / math.log(2), "lls": lls}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", nargs="?", default="smollm2-135m")
    p.add_argument("--items", type=int, default=100)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--text-chars", type=int, default=8000, help="characters of the built-in text scored")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch
    from lm_eval.models.huggingface import HFLM

    import herd
    from herd.eval.tasks import make_task
    from herd.eval.tasks.base import BUILTIN
    from herd.models import resolve

    path = resolve(args.source)
    threads = torch.get_num_threads()
    herd_q = herd.load(path)
    herd_f = herd.load(path, dtype="float32")
    torch.set_num_threads(threads)
    hf = HFLM(pretrained=str(path.parent), gguf_file=path.name, batch_size=args.batch_size, max_length=args.context,
              dtype="float32", device="cpu")
    items, pairs = mc_pairs(make_task("mc-arithmetic", limit=args.items, seed=0))
    text = (BUILTIN / "shakespeare-20k.txt").read_text()[:args.text_chars]
    sides = {"herd": lambda: run_herd(herd_q, items, pairs, text, args.context, args.batch_size),
             "herd fp32": lambda: run_herd(herd_f, items, pairs, text, args.context, args.batch_size),
             "lm-eval hf": lambda: run_hf(hf, items, pairs, text)}
    runs = {k: [] for k in sides}
    for r in range(args.runs):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in order:
            runs[name].append(sides[name]())
    summary = {}
    for name, rs in runs.items():
        summary[name] = {"mc_seconds": statistics.median(x["mc_seconds"] for x in rs),
                         "ppl_seconds": statistics.median(x["ppl_seconds"] for x in rs),
                         "acc": rs[0]["acc"], "bits_per_byte": rs[0]["bits_per_byte"]}
    ref = runs["lm-eval hf"][0]["lls"]
    for name in ("herd", "herd fp32"):
        summary[name]["max_abs_loglik_diff_vs_hf"] = max(abs(a - b) for a, b in zip(runs[name][0]["lls"], ref))
    base = summary["lm-eval hf"]
    print(f"{path.name}: {args.items} multiple-choice items ({len(pairs)} requests), perplexity over "
          f"{len(text)} characters in windows of {args.context} tokens; batch {args.batch_size}, {threads} threads, "
          f"{platform.processor() or platform.machine()}, medians of {args.runs} runs")
    heads = ("MC s", "speed-up", "acc", "PPL s", "speed-up", "bits/byte", "max |dLL|")
    print(f"{'':<12} " + " ".join(f"{h:>{w}}" for h, w in zip(heads, (8, 9, 7, 8, 9, 10, 10))))
    for name, s in summary.items():
        print(f"{name:<12} {s['mc_seconds']:>8.2f} {base['mc_seconds'] / s['mc_seconds']:>8.2f}x {s['acc']:>7.3f} "
              f"{s['ppl_seconds']:>8.2f} {base['ppl_seconds'] / s['ppl_seconds']:>8.2f}x {s['bits_per_byte']:>10.4f} "
              f"{s.get('max_abs_loglik_diff_vs_hf', 0):>10.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"source": str(path), "args": vars(args), "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
