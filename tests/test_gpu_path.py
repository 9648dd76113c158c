"""The GPU path: decode steps padded to a few fixed shapes (herd.engine.graphs) and, on CUDA, captured as
CUDA graphs. On a CPU-only machine the padded steps run eagerly and must change no output; what needs a
GPU is skipped. Reference: the same requests decoded alone, unpadded (LLM.generate)."""

import pytest
import torch

from herd.engine import Engine, Request
from herd.engine.graphs import StaticDecode, capturable
from herd.sampling import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away, there",
           "Q: What is 12 * 7?\nA:", "Roses are red,"]


def _run(engine, requests):
    for r in requests:
        engine.add_request(r)
    out = {r.request_id: [] for r in requests}
    while engine.has_work():
        for o in engine.step():
            assert o.error is None, o.error
            out[o.request_id] += o.token_ids
    return out


def test_shapes_round_up_to_buckets():
    from herd.model import PagedKVCache

    cache = PagedKVCache(1, 1, 4, 8, 16)
    s = StaticDecode(None, cache, max_batch=20, max_blocks=64, capture=False)
    assert s.shape(1, 1) == (1, 1) and s.shape(3, 3) == (4, 4) and s.shape(17, 33) == (20, 64)
    assert s.shape(9, 64) == (16, 64) and s.shape(2, 5) == (2, 8)


def test_padded_decode_steps_give_what_each_request_gives_alone(smollm2):
    llm = smollm2
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    lengths = [5, 9, 13, 7, 11]
    alone = {f"r{i}": llm.generate(ids, max_tokens=n, temperature=0, stop_token_ids=[]).token_ids
             for i, (ids, n) in enumerate(zip(prompts, lengths))}
    engine = Engine(llm.model, llm.tokenizer, max_batch=6, context=256)
    static = engine.runner.static = StaticDecode(llm.model, engine.runner.cache, 6, 16, capture=False)
    steps = []
    real = static._forward
    static._forward = lambda t, p, table: (steps.append((int((p[:, 0] > 0).sum()), t.shape[0], table.shape[1])),
                                           real(t, p, table))[1]
    got = _run(engine, [Request(f"r{i}", ids, n, SamplingParams(temperature=0), frozenset())
                        for i, (ids, n) in enumerate(zip(prompts, lengths))])
    assert got == alone
    assert all(rows in (1, 2, 4, 6) and blocks in (1, 2, 4, 8, 16) for _, rows, blocks in steps)
    assert any(real_rows < rows for real_rows, rows, _ in steps)  # padding rows were decoded alongside


def test_moe_models_are_not_captured():
    from herd.config import ModelArgs, MoEArgs
    from herd.model import Transformer

    dense = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, hidden_dim=64,
                                  norm_eps=1e-5, rope_theta=1e4, max_seq_len=64))
    assert capturable(dense)
    moe_args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, hidden_dim=64, norm_eps=1e-5,
                         rope_theta=1e4, max_seq_len=64,
                         moe=MoEArgs(num_experts=2, top_k=1, hidden_dim=32, layers=(0,)))
    assert not capturable(Transformer(moe_args))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_graphs_replay_what_the_eager_steps_compute(smollm2_path):
    import herd

    llm = herd.load(smollm2_path, device="cuda", dtype="float32")
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    requests = lambda: [Request(f"r{i}", ids, 12, SamplingParams(temperature=0), frozenset())  # noqa: E731
                        for i, ids in enumerate(prompts)]
    eager = Engine(llm.model, llm.tokenizer, max_batch=8, context=256)
    eager.runner.static = None
    graphed = Engine(llm.model, llm.tokenizer, max_batch=8, context=256)
    assert graphed.runner.static is not None and graphed.runner.static.capture
    assert _run(graphed, requests()) == _run(eager, requests())
    assert graphed.runner.static.graphs
