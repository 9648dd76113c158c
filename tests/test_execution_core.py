"""The execution core: a paged KV cache shared by prefix, and batched decoding that changes no output.

References: the single-request generator (LLM.generate, a batch of one) for what each request must give,
and a cold run for what a prefix-cache hit must give; the block manager is checked against its contract.
"""

import os

import pytest

from herd.engine import Engine, Request
from herd.engine.blocks import BlockManager
from herd.sampling import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,",
           "Q: What is 12 * 7?\nA:", "The three primary colours are", "Roses are red,", "import numpy as np\n",
           "In 1492, Columbus", "The quick brown fox", "My favourite food is", "Water boils at",
           "The largest planet in the solar system is", "To be or not to be,", "Dear Sir or Madam,",
           "Here is a list of fruits: apple,", "SELECT * FROM"]


# -- the block manager ----------------------------------------------------------------------------------------


def test_blocks_are_shared_by_prefix_and_freed_by_reference_count():
    m = BlockManager(num_blocks=16, block_size=4)
    a = m.admit(list(range(10)), total=12)
    assert a.table == [] and a.reserved == 3  # nothing cached yet: 3 blocks promised
    m.grow(a, 10)
    m.filled(a, list(range(10)), 10)  # blocks 0..3 and 4..7 are full, 8..9 not
    assert len(a.table) == 3 and len(m.by_key) == 2
    b = m.admit(list(range(8)) + [99, 98, 97], total=11)  # the same first 8 tokens
    assert b.table == a.table[:2] and m.refs[a.table[0]] == 2  # shared, counted twice
    c = m.admit(list(range(8)), total=9)  # all 8 cached: the last block is computed again (its logits)
    assert c.table == a.table[:1]
    m.release(a)
    assert m.refs[b.table[0]] == 2 and a.table == []
    m.release(b)
    m.release(c)
    assert m.in_use == 0 and m.reserved == 0
    assert len(m.idle) == 2  # freed but still findable
    assert set(m.cached_prefix(list(range(8)))) == set(m.idle)


def test_eviction_takes_least_recently_used_idle_blocks_never_blocks_in_use():
    m = BlockManager(num_blocks=5, block_size=2)  # 4 usable blocks
    first = m.admit([1, 2, 3], total=4)
    m.grow(first, 3)
    m.filled(first, [1, 2, 3], 3)
    m.release(first)  # block with [1, 2] is idle and cached
    running = m.admit([7, 8, 9], total=8)  # 4 blocks promised: the 3 free ones and the idle one
    assert running is not None and m.available == 0
    m.grow(running, 6)  # takes the free blocks first
    assert m.cached_prefix([1, 2, 3]) != []
    m.grow(running, 8)  # then evicts the idle one
    assert m.cached_prefix([1, 2, 3]) == []
    assert m.admit([5, 6, 7], total=4) is None  # nothing free or idle is left: refused, not taken from `running`
    assert len(set(running.table)) == 4 and 0 not in running.table


def test_a_block_key_covers_everything_before_it():
    m = BlockManager(num_blocks=8, block_size=2)
    assert m.keys([1, 2, 3, 4])[0] == m.keys([1, 2])[0]
    assert m.keys([9, 9, 3, 4])[1] != m.keys([1, 2, 3, 4])[1]  # same block, other prefix: another key


# -- batching and prefix caching through the engine ---------------------------------------------------------------


def _run(engine: Engine, requests: list[Request], bound: int = 2000) -> dict[str, list[int]]:
    for r in requests:
        engine.add_request(r)
    out = {r.request_id: [] for r in requests}
    for _ in range(bound):
        if not engine.has_work():
            break
        for o in engine.step():
            assert o.error is None, o.error
            out[o.request_id] += o.token_ids
    assert not engine.has_work()
    return out


def _greedy(llm, prompt_ids, rid, n):
    return Request(rid, prompt_ids, n, SamplingParams(temperature=0), frozenset(llm.stop_ids))


@pytest.mark.parametrize("path", ["reference", "kernels"])
def test_sixteen_concurrent_requests_give_what_each_gives_alone(path, smollm2, smollm2_q):
    """16 greedy requests of different lengths decoding together (rows at different positions, each through
    its own blocks) give exactly the tokens each gives alone; then again with every prompt's prefix cached."""
    llm = smollm2 if path == "reference" else smollm2_q
    system = "You are a helpful assistant who answers in one sentence. " * 3  # a shared prefix, several blocks
    prompts = [llm.tokenizer.encode(system + p) for p in PROMPTS]
    lengths = [6 + 2 * i for i in range(16)]  # different output lengths too
    alone = {f"r{i}": llm.generate(ids, max_tokens=n, temperature=0, stop_token_ids=[]).token_ids
             for i, (ids, n) in enumerate(zip(prompts, lengths))}
    engine = Engine(llm.model, llm.tokenizer, max_batch=16, context=256, prefill_budget=64)
    decoded = sum(len(t) for t in alone.values()) - len(alone)  # tokens fed back one at a time
    for round_ in ("cold", "cached"):
        before = engine.runner.computed_tokens
        got = _run(engine, [_greedy(llm, ids, f"r{i}", n) for i, (ids, n) in enumerate(zip(prompts, lengths))])
        assert got == alone, round_
        prompt_computed = engine.runner.computed_tokens - before - decoded
        if round_ == "cold":
            assert prompt_computed == sum(len(p) for p in prompts)  # all admitted at once: nothing cached yet
        else:  # every prompt's full blocks were cached: at most its last block is computed again
            assert len(prompts) <= prompt_computed <= len(prompts) * engine.blocks.block_size, prompt_computed
    assert engine.blocks.in_use == 0 and engine.blocks.reserved == 0


def _tokens_and_logprobs(engine: Engine, request: Request):
    engine.add_request(request)
    tokens, logprobs = [], []
    while engine.has_work():
        for o in engine.step():
            tokens += o.token_ids
            logprobs += o.logprobs or []
    return tokens, logprobs


@pytest.mark.parametrize("path", ["reference", "kernels"])
def test_prefix_hit_computes_only_the_new_tokens_and_changes_nothing(path, smollm2, smollm2_q):
    """What differs between the runs is float reassociation only: one 230-token forward against a 200- and
    a 30-token one, a causal attention kernel against a masked one (1e-4 on the fp32 reference path's
    GEMMs; 1e-3 on the kernel path, whose activations are quantized per token)."""
    llm = smollm2 if path == "reference" else smollm2_q
    history = llm.tokenizer.encode("The history of the Roman Empire spans many centuries. " * 20)  # ~200 tokens
    question = " In summary, and leaving aside the many wars, crises and reforms of those centuries, the empire"
    ids = history + llm.tokenizer.encode(question, bos=False)
    request = lambda rid: Request(rid, ids, 8, SamplingParams(temperature=0), frozenset(llm.stop_ids),  # noqa: E731
                                  logprobs=3)
    cold = _tokens_and_logprobs(Engine(llm.model, llm.tokenizer, max_batch=2, context=512), request("cold"))
    warm = Engine(llm.model, llm.tokenizer, max_batch=2, context=512)
    _run(warm, [_greedy(llm, history + llm.tokenizer.encode(" Later,", bos=False), "first", 2)])
    before = warm.runner.computed_tokens
    tokens, logprobs = _tokens_and_logprobs(warm, request("warm"))
    bs = warm.blocks.block_size
    cached = len(history) // bs * bs  # the full blocks of the shared history
    assert cached >= 192
    assert warm.runner.computed_tokens - before == len(ids) - cached + len(tokens) - 1  # new prompt part, decodes
    assert tokens == cold[0]
    tolerance = 1e-4 if path == "reference" else 1e-3
    for a, b in zip(logprobs, cold[1], strict=True):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=tolerance)
        assert [t for t, _, _ in a.top] == [t for t, _, _ in b.top]


def test_eviction_under_memory_pressure_never_corrupts_a_running_sequence(smollm2_q):
    """A pool with room for about three sequences: requests keep arriving with prefixes that fill and
    evict the cache while others decode; every request still gives its own tokens."""
    llm = smollm2_q
    prompts = [llm.tokenizer.encode(f"Story number {i}: " + p) for i, p in enumerate(PROMPTS[:10])]
    alone = {f"r{i}": llm.generate(ids, max_tokens=12, temperature=0, stop_token_ids=[]).token_ids
             for i, ids in enumerate(prompts)}
    engine = Engine(llm.model, llm.tokenizer, max_batch=4, context=64, block_size=4, kv_blocks=1 + 3 * 8)
    got = _run(engine, [_greedy(llm, ids, f"r{i}", 12) for i, ids in enumerate(prompts)])
    assert got == alone
    again = _run(engine, [_greedy(llm, ids, f"s{i}", 12) for i, ids in enumerate(prompts)])
    assert {k.replace("s", "r"): v for k, v in again.items()} == alone


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_an_idle_engine_holds_no_kv_memory(smollm2_q):
    """The KV cache's blocks are reserved address space: an engine able to hold 8 x 8192 tokens (1.4 GiB
    of fp32 keys and values for this model) costs next to nothing until tokens are written."""
    llm = smollm2_q
    before = _rss()
    engine = Engine(llm.model, llm.tokenizer, max_batch=8, context=8192)
    grown = _rss() - before
    assert engine.kv_cache_bytes > 2**30
    assert grown < 0.02 * engine.kv_cache_bytes, (grown, engine.kv_cache_bytes)
    _run(engine, [_greedy(llm, llm.tokenizer.encode("Hello"), "a", 4)])
    assert _rss() - before < 0.02 * engine.kv_cache_bytes  # one short request touched a few blocks only


def test_prefill_groups_keep_padding_under_the_bound():
    from herd.engine.runner import PAD_WASTE, prefill_groups
    from herd.engine.scheduler import PrefillChunk

    chunks = [PrefillChunk(None, 0, n) for n in (40, 38, 36, 35, 9, 8, 200)]
    groups = prefill_groups(chunks)
    assert sorted(c.end for g in groups for c in g) == sorted(c.end for c in chunks)
    for g in groups:
        real = sum(c.end - c.start for c in g)
        assert max(c.end - c.start for c in g) * len(g) <= (1 + PAD_WASTE) * real
    assert [len(g) for g in groups] == [1, 4, 2]  # 200 alone; the four ~40s together; the two short ones


@pytest.mark.parametrize("path", ["reference", "kernels"])
def test_prompts_of_several_requests_share_one_forward_and_score_as_alone(path, smollm2, smollm2_q):
    """Prompt log-probabilities (what an evaluation asks for) of six requests of different lengths, prefilled
    together in padded forwards, equal each prompt scored alone in one uncached forward (llm.logits)."""
    import torch

    llm = smollm2 if path == "reference" else smollm2_q
    prompts = [llm.tokenizer.encode(p + " and so the story goes on.") for p in PROMPTS[:6]]
    # fp32 keys: llm.logits attends to unrounded ones (the default fp16 cache is checked on its own below)
    engine = Engine(llm.model, llm.tokenizer, max_batch=8, context=128, prefill_budget=512, kv_dtype=torch.float32)
    forwards = []
    real_forward = llm.model.forward
    llm.model.forward = lambda tokens, *a, **k: (forwards.append(tuple(tokens.shape)), real_forward(tokens, *a, **k))[1]
    try:
        requests = [Request(f"p{i}", ids, 1, SamplingParams(temperature=0), frozenset(), prompt_logprobs=0)
                    for i, ids in enumerate(prompts)]
        for r in requests:
            engine.add_request(r)
        got = {}
        while engine.has_work():
            for o in engine.step():
                if o.prompt_logprobs is not None:
                    got[o.request_id] = o.prompt_logprobs
    finally:
        del llm.model.forward
    prefills = [s for s in forwards if s[1] > 1]
    assert len(prefills) < len(prompts) and max(s[0] for s in prefills) > 1, forwards
    tolerance = 1e-4 if path == "reference" else 2e-3
    for i, ids in enumerate(prompts):
        expected = torch.log_softmax(llm.logits(ids), dim=-1)
        scored = got[f"p{i}"]
        assert scored[0] is None and len(scored) == len(ids)
        for pos in range(1, len(ids)):
            assert scored[pos].token_id == ids[pos]
            assert scored[pos].logprob == pytest.approx(float(expected[pos - 1, ids[pos]]), abs=tolerance)


def test_the_cpu_paths_default_fp16_keys_keep_the_greedy_outputs_of_fp32_keys(smollm2_q):
    """herd's quantized CPU path keeps keys and values in fp16 (half of fp32's memory, what llama.cpp keeps):
    16 greedy requests give exactly the tokens an fp32 cache gives."""
    import torch

    llm = smollm2_q
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    half = Engine(llm.model, llm.tokenizer, max_batch=16, context=128)
    full = Engine(llm.model, llm.tokenizer, max_batch=16, context=128, kv_dtype=torch.float32)
    assert half.runner.cache.k[0].dtype == torch.float16 and half.kv_cache_bytes * 2 == full.kv_cache_bytes
    requests = lambda: [_greedy(llm, ids, f"r{i}", 32) for i, ids in enumerate(prompts)]  # noqa: E731
    assert _run(half, requests()) == _run(full, requests())


@pytest.mark.parametrize("path", ["reference", "kernels"])
def test_shared_contexts_score_their_continuations_as_whole_sequences_do(path, smollm2, smollm2_q):
    """herd.engine.scoring runs a context once and each continuation from its end (one-token cache blocks):
    every continuation token's log-probability equals that of the whole sequence scored alone."""
    import torch

    from herd.engine.scoring import continuation_logprobs

    llm = smollm2 if path == "reference" else smollm2_q
    enc = lambda t: llm.tokenizer.encode(t, bos=False)  # noqa: E731
    pairs = []
    for question in ("Question: What is 2 + 3?\nAnswer:", "The capital of France is", "Roses are"):
        for choice in (" 5", " Paris, the city of light", " red and violets are blue", " x", " 168", " 161"):
            pairs.append((llm.tokenizer.encode(question), enc(choice)))
    pairs.append((llm.tokenizer.encode("Alone here"), enc(" and nowhere else")))
    # choices that share more than their context (the prefix runs once with it), and one that is all prefix
    for choice in (" 1,000 apples", " 1,000 apples and pears", " 1,000 pears", " 1,000"):
        pairs.append((llm.tokenizer.encode("How many?"), enc(choice)))
    pairs.append((llm.tokenizer.encode("One choice"), enc(" only, and long enough to share")))
    got = continuation_logprobs(llm.model, pairs, batch_size=2)
    # bf16 activations round differently in differently shaped products: a relative bound as well
    tolerance = dict(abs=1e-4) if path == "reference" else dict(abs=2e-3, rel=1e-3)
    for (context, continuation), (lps, greedy) in zip(pairs, got):
        whole = torch.log_softmax(llm.logits(context + continuation), dim=-1)
        at = range(len(context) - 1, len(context) + len(continuation) - 1)
        want = [float(whole[p, t]) for p, t in zip(at, continuation)]
        assert lps == pytest.approx(want, **tolerance)
        assert greedy == all(int(whole[p].argmax()) == t for p, t in zip(at, continuation))
