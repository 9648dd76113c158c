"""The GPU path on a Llama-3.1-8B-shaped model (random bf16 weights): decode tokens/s at batch 1 against
the GPU's memory-bandwidth bound, and aggregate tokens/s at 16 and 64 concurrent sequences, with the
decode step replayed from CUDA graphs (herd.engine.graphs) and, in the same run, eager.

    python benchmarks/gpu.py [--layers 32] [--tokens 256] [--json OUT]

Speed depends on the shape, not on what the weights learned, so the weights are random (N(0, 0.02)) and
built on the GPU: no file, no download. The bound: each decode step reads every weight once (the output
matrix included; the embedding only one row per token) plus the keys and values so far, so
tokens/s <= bandwidth / bytes read per token. Bandwidth is the card's published peak (H100 SXM 3.35 TB/s,
H200 4.8 TB/s; `--bandwidth` for another card), so the ratio is what share of the peak herd reaches.
Needs a CUDA GPU; prints one line per measurement and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from herd.config import ModelArgs
from herd.engine import Engine, Request
from herd.model import Transformer
from herd.model.rope import inverse_frequencies
from herd.sampling import SamplingParams
from herd.tokenizer.base import Tokenizer

PEAK_TBPS = {"H100": 3.35, "H200": 4.8, "A100": 2.0}


class IdTokenizer(Tokenizer):
    """Token ids as text: the engine detokenizes what it generates, and random weights generate anything."""

    vocab_size = 128256
    bos_id, eos_id, stop_ids = None, None, ()

    def encode(self, text, bos=None, eos=False, special=False):
        return [int(t) for t in text.split()]

    def decode(self, ids, skip_special=False):
        return "".join(f" {i}" for i in ids)

    def special_id(self, text):
        return None

    def id_to_piece(self, token_id):
        return f" {token_id}"


def llama31_8b(layers: int) -> ModelArgs:
    return ModelArgs(dim=4096, n_layers=layers, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336,
                     norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192)


def random_model(args: ModelArgs, device: str) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.inv_freq = inverse_frequencies(args).to(device)
    return model.eval().requires_grad_(False)


def weight_bytes_per_token(model: Transformer) -> int:
    read = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n != "tok_embeddings.weight")
    return read + model.args.dim * 2  # one embedding row


def _sync(model) -> None:
    if model.inv_freq.is_cuda:
        _sync(model)


def decode_rate(model, concurrent: int, tokens: int, graphs: bool, prompt: int = 32) -> tuple[float, float]:
    """(aggregate decode tokens/s, mean context length) of `concurrent` sequences decoding together."""
    engine = Engine(model, IdTokenizer(), max_batch=concurrent, context=prompt + tokens + 1, prefill_budget=8192)
    if not graphs:
        engine.runner.static = None
    g = torch.Generator().manual_seed(0)
    for i in range(concurrent):
        ids = torch.randint(0, 128256, (prompt,), generator=g).tolist()
        engine.add_request(Request(f"r{i}", ids, tokens, SamplingParams(temperature=0), frozenset()))
    while any(s.prefilling for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prompts in, and the first token
    _sync(model)
    start, produced = time.perf_counter(), 0
    while engine.has_work():
        produced += sum(len(o.token_ids) for o in engine.step())
    _sync(model)
    return produced / (time.perf_counter() - start), prompt + tokens / 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--tokens", type=int, default=256, help="tokens decoded per sequence")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--bandwidth", type=float, default=None, help="TB/s (default: the card's published peak)")
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda", help="cuda; cpu only to check the script itself (--layers 1)")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU")
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    tbps = a.bandwidth or next((v for k, v in PEAK_TBPS.items() if k in name), None)
    model = random_model(llama31_8b(a.layers), a.device)
    args = model.args
    kv_per_token = 2 * args.n_layers * args.n_kv_heads * args.head_dim * 2
    weights = weight_bytes_per_token(model)
    print(f"{name}; Llama-3.1-8B shape, {a.layers} layers, bf16: {weights / 1e9:.2f} GB read per decode step")
    results = {"device": name, "layers": a.layers, "weight_bytes": weights, "peak_tbps": tbps, "runs": {}}
    for graphs in (True, False):
        for batch in [int(b) for b in a.batches.split(",")]:
            decode_rate(model, batch, 8, graphs)  # warm up: cuBLAS heuristics, graph captures at small lengths
            rates = [decode_rate(model, batch, a.tokens, graphs) for _ in range(a.runs)]
            rate, ctx = statistics.median(r for r, _ in rates), rates[0][1]
            row = {"tokens_per_s": rate}
            line = f"{'graphs' if graphs else 'eager '} batch {batch:3d}: {rate:9.1f} tok/s"
            if batch == 1 and tbps:
                bound = tbps * 1e12 / (weights + kv_per_token * ctx)
                row["bound_tokens_per_s"], row["share_of_bound"] = bound, rate / bound
                line += f"  (bound {bound:.0f} tok/s at {tbps} TB/s: {rate / bound:.0%})"
            print(line, flush=True)
            results["runs"][f"{'graphs' if graphs else 'eager'}-{batch}"] = row
    g, e = results["runs"], results["runs"]
    for batch in a.batches.split(","):
        print(f"batch {batch}: graphs / eager = {g[f'graphs-{batch}']['tokens_per_s'] / e[f'eager-{batch}']['tokens_per_s']:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
