"""LoRA training speed and memory: herd vs HF transformers + PEFT on SmolLM2-135M, in the same run.

    .venv/bin/python benchmarks/finetune.py [--runs 3] [--steps 4] [--batch 4] [--seq 128] [--threads N]

Both train the same LoRA (rank 8, alpha 16, q,k,v,o,gate,up,down) with AdamW on the same fixed batch of
token ids, from the same GGUF file dequantized to float32 (transformers reads it with its own GGUF loader),
with the same threads. Each engine runs in a fresh process per run (so peak RSS is its own); one warm-up
step, then `--steps` timed steps. herd's QLoRA (base kept as Q4_1 blocks) is measured too, for memory.
Reported: medians of the runs of training tokens/s and peak RSS, and herd/HF ratios.

`floor` is no trainer: it times only the float32 products any exact LoRA step must make at these shapes
(each frozen projection forward and its input gradient, the output projection and its input gradient,
and attention forward and backward), each alone in a warm loop, and reports the tokens/s of a step that
did nothing else: the ceiling of an exact float32 LoRA step on this machine, whatever the framework.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def fixed_batch(batch: int, seq: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def run_herd(args, qlora: bool) -> dict:
    import torch

    import herd
    from herd.finetune import TrainConfig, prepare_model
    from herd.finetune.data import Example, Row
    from herd.finetune.train import Trainer
    from tests.conftest import SMOLLM2

    torch.manual_seed(0)
    llm = herd.load(str(SMOLLM2), device="cpu", threads=args.threads,
                    **({"quantized": "trainable"} if qlora else {"dtype": "float32", "quantized": False}))
    config = TrainConfig(method="qlora" if qlora else "lora", lora_rank=8, lora_alpha=16, batch_size=args.batch,
                         steps=args.steps + 1, lr=1e-4, max_grad_norm=None,
                         activation_checkpointing=args.checkpointing)
    prepare_model(llm, config)
    ids = fixed_batch(args.batch, args.seq, llm.config.vocab_size)
    rows = []
    for r in range(args.batch):
        row = Row()
        row.add(Example(ids[r].tolist(), [True] * args.seq))
        rows.append(row)
    trainer = Trainer(llm.model, config, rows)
    trainer.train_step()  # warm-up
    started = time.perf_counter()
    for _ in range(args.steps):
        record = trainer.train_step()
    seconds = time.perf_counter() - started
    return {"tokens_per_s": args.batch * args.seq * args.steps / seconds, "loss": record["loss"]}


def run_hf(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.conftest import SMOLLM2

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name, dtype=torch.float32)
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = fixed_batch(args.batch, args.seq, model.config.vocab_size)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step()
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    seconds = time.perf_counter() - started
    return {"tokens_per_s": args.batch * args.seq * args.steps / seconds, "loss": loss}


def run_floor(args) -> dict:
    import torch
    import torch.nn.functional as F

    from herd.formats import open_checkpoint
    from tests.conftest import SMOLLM2

    torch.set_num_threads(args.threads)
    a = open_checkpoint(SMOLLM2).args
    tokens = args.batch * args.seq

    def best(fn, repeat=5) -> float:
        fn()
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    projections = [(a.dim, q), (a.dim, kv), (a.dim, kv), (q, a.dim), (a.dim, a.hidden_dim), (a.dim, a.hidden_dim),
                   (a.hidden_dim, a.dim)]
    seconds = 0.0
    for inp, out in projections:  # forward x W^T and input gradient dy W, per layer
        x, dy, w = torch.randn(tokens, inp), torch.randn(tokens, out), torch.randn(out, inp)
        seconds += a.n_layers * (best(lambda: x @ w.T) + best(lambda: dy @ w))
    h = torch.randn(tokens, a.dim)
    head = torch.randn(a.vocab_size, a.dim) * 0.02
    block = 1024  # the output projection at its fastest layout here: vocabulary blocks that stay in cache
    probs = torch.randn(tokens, block)
    seconds += best(lambda: [h @ head[i:i + block].T for i in range(0, a.vocab_size, block)])
    seconds += best(lambda: [probs @ head[i:i + block] for i in range(0, a.vocab_size, block)])
    qs = torch.randn(args.batch, a.n_heads, args.seq, a.head_dim, requires_grad=True)
    ks = torch.randn(args.batch, a.n_kv_heads, args.seq, a.head_dim, requires_grad=True)
    vs = torch.randn(args.batch, a.n_kv_heads, args.seq, a.head_dim, requires_grad=True)
    grad = torch.randn(args.batch, a.n_heads, args.seq, a.head_dim)

    def attention():
        F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True).backward(grad)

    seconds += a.n_layers * best(attention)
    return {"tokens_per_s": tokens / seconds, "loss": None}


def worker(args) -> None:
    if args.worker == "floor":
        out = run_floor(args)
    elif args.worker == "hf":
        out = run_hf(args)
    else:
        out = run_herd(args, qlora=args.worker == "herd-qlora")
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in both")
    p.add_argument("--engines", default="herd,hf,herd-qlora,floor")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads is None:
        from herd.runtime import physical_cores

        args.threads = physical_cores()
    if args.worker:
        worker(args)
        return 0
    engines = args.engines.split(",")
    results: dict[str, list[dict]] = {e: [] for e in engines}
    for run in range(args.runs):
        for engine in engines:  # interleaved, so drift in the machine's load hits every engine alike
            cmd = [sys.executable, __file__, "--worker", engine, "--steps", str(args.steps), "--batch",
                   str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
            if args.checkpointing:
                cmd.append("--checkpointing")
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"{engine} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                return 1
            results[engine].append(json.loads(line[7:]))
            print(f"run {run + 1} {engine}: {results[engine][-1]}", file=sys.stderr)
    print(f"\nLoRA r=8 on SmolLM2-135M, batch {args.batch} x {args.seq} tokens, {args.threads} threads, "
          f"{args.steps} timed steps, median of {args.runs} runs")
    med = {e: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "peak_rss_mib")}
           for e, rs in results.items()}
    print(f"{'engine':<12} {'train tok/s':>12} {'peak RSS MiB':>13}")
    for e, m in med.items():
        print(f"{e:<12} {m['tokens_per_s']:>12.1f} {m['peak_rss_mib']:>13.0f}")
    if "herd" in med and "hf" in med:
        print(f"herd / HF+PEFT: {med['herd']['tokens_per_s'] / med['hf']['tokens_per_s']:.2f}x tokens/s, "
              f"{med['herd']['peak_rss_mib'] / med['hf']['peak_rss_mib']:.2f}x peak RSS")
    if "floor" in med and "hf" in med:
        print(f"float32 product floor / HF+PEFT: {med['floor']['tokens_per_s'] / med['hf']['tokens_per_s']:.2f}x "
              "(no exact float32 LoRA step here can be faster; its RSS is not a trainer's)")
    if "herd" in med and "herd-qlora" in med:
        print(f"herd QLoRA / LoRA peak RSS: {med['herd-qlora']['peak_rss_mib'] / med['herd']['peak_rss_mib']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
