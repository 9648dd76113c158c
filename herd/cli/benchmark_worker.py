"""One measurement in a fresh process: `python bench_worker.py ENGINE SPEC_JSON` prints one JSON line.

Standalone on purpose (no herd import at module level): llama.cpp runs it from its own virtual environment.
Engines: "herd" (herd.load), "llama.cpp" (llama-cpp-python), "hf" (transformers' GGUF loading, fp32 on
the CPU: the usual PyTorch path). Every engine gets the same token ids, threads and greedy decoding.

Measured: load_s (the load call), first_token_s (the load call's start to the first generated token of a
short prompt), start_first_token_s (the same from process start: imports included, `import torch` alone
takes 1-2 s), prefill_tps (a fresh 512-token prompt, best of 2), decode_tps (greedy tokens
after the first, one token per forward), peak_rss_mb (ru_maxrss of this process).
"""

from __future__ import annotations

import json
import resource
import sys
import time

T0 = time.perf_counter()


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_herd(spec: dict) -> dict:
    import torch

    import herd
    from herd.generate import generate_steps
    from herd.model import Batch, PagedKVCache
    from herd.sampling import SamplingParams

    t = time.perf_counter()
    llm = herd.load(spec["path"], threads=spec["threads"], **spec.get("herd_options", {}))
    load_s = time.perf_counter() - t
    short, long_ids, n_decode = spec["short"], spec["long"], spec["decode"]

    def steps(ids, n):  # greedy, as the other engines decode
        return generate_steps(llm.model, llm.tokenizer, ids, n, SamplingParams(temperature=0), stop_ids=())

    it = steps(short, 1)
    next(it)
    first_token_s, start_first_token_s = time.perf_counter() - t, time.perf_counter() - T0
    prefill = []
    for _ in range(2):
        cache = PagedKVCache.for_model(llm.config, len(long_ids) + 1, dtype=llm.model.tok_embeddings.weight.dtype)
        tokens = torch.tensor([long_ids])
        t = time.perf_counter()
        with torch.inference_mode():
            llm.model(tokens, Batch.rows(cache, [list(range(1, cache.num_blocks))], [0], len(long_ids)),
                      last_only=True)
        prefill.append(len(long_ids) / (time.perf_counter() - t))
    for _ in steps(short, 8):  # warm-up (and compilation, where the decode step is compiled)
        pass
    stamps = [time.perf_counter() for _ in steps(short, n_decode + 1)]
    decode_tps = n_decode / (stamps[-1] - stamps[0])
    return dict(load_s=load_s, first_token_s=first_token_s, start_first_token_s=start_first_token_s,
                prefill_tps=max(prefill), decode_tps=decode_tps,
                detail=f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def run_llama_cpp(spec: dict) -> dict:
    import llama_cpp

    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=spec["path"], n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=spec["threads"],
                          n_threads_batch=spec["threads"], verbose=False)
    load_s = time.perf_counter() - t
    short, long_ids, n_decode = spec["short"], spec["long"], spec["decode"]
    gen = llm.generate(short, top_k=1, temp=0.0, reset=True)
    next(gen)
    first_token_s, start_first_token_s = time.perf_counter() - t, time.perf_counter() - T0
    gen.close()
    prefill = []
    for _ in range(2):
        llm.reset()
        t = time.perf_counter()
        llm.eval(long_ids)
        prefill.append(len(long_ids) / (time.perf_counter() - t))
    stamps = []
    for i, _ in enumerate(llm.generate(short, top_k=1, temp=0.0, reset=True)):
        stamps.append(time.perf_counter())
        if i == n_decode:
            break
    decode_tps = n_decode / (stamps[-1] - stamps[0])
    return dict(load_s=load_s, first_token_s=first_token_s, start_first_token_s=start_first_token_s,
                prefill_tps=max(prefill), decode_tps=decode_tps,
                detail=f"llama-cpp-python {llama_cpp.__version__}")


def run_hf(spec: dict) -> dict:
    from pathlib import Path

    import torch
    import transformers

    torch.set_num_threads(spec["threads"])
    path = Path(spec["path"])
    t = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    load_s = time.perf_counter() - t
    short, long_ids, n_decode = spec["short"], spec["long"], spec["decode"]
    greedy = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(torch.tensor([short]), max_new_tokens=1, **greedy)
        first_token_s, start_first_token_s = time.perf_counter() - t, time.perf_counter() - T0
        prefill = []
        for _ in range(2):
            t = time.perf_counter()
            model(torch.tensor([long_ids]), use_cache=True, logits_to_keep=1)
            prefill.append(len(long_ids) / (time.perf_counter() - t))
        # greedy decode: one token per forward through the KV cache, timed after the first token
        out = model(torch.tensor([short]), use_cache=True, logits_to_keep=1)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(n_decode):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        decode_tps = n_decode / (time.perf_counter() - t)
    return dict(load_s=load_s, first_token_s=first_token_s, start_first_token_s=start_first_token_s,
                prefill_tps=max(prefill), decode_tps=decode_tps,
                detail=f"transformers {transformers.__version__}, fp32, {torch.get_num_threads()} threads")


ENGINES = {"herd": run_herd, "llama.cpp": run_llama_cpp, "hf": run_hf}

if __name__ == "__main__":
    engine, spec = sys.argv[1], json.loads(sys.argv[2])
    result = ENGINES[engine](spec)
    result["peak_rss_mb"] = _rss_mb()
    print("HERD-BENCH " + json.dumps(result), flush=True)
