"""Engine parts without HTTP: the scheduler with fake requests (no tensors), the JSON-schema automaton,
and the engine on SmolLM2 against the single-request generator."""

from __future__ import annotations

import json

import jsonschema
import pytest

from herd.engine import Engine, QueueFull, Request
from herd.engine.constrained import Grammar, UnsupportedSchema
from herd.engine.metrics import Metrics
from herd.engine.blocks import BlockManager
from herd.engine.scheduler import Scheduler, Sequence
from herd.sampling import SamplingParams


def seq(n_prompt: int, rid: str = "r") -> Sequence:
    return Sequence(Request(rid, list(range(1, n_prompt + 1)), max_tokens=4), list(range(1, n_prompt + 1)))


def test_scheduler_admits_while_decoding_and_frees_blocks_at_once():
    s = Scheduler(max_batch=2, max_queue=2, blocks=BlockManager(64, 4), prefill_budget=8)
    a, b, c = seq(3, "a"), seq(20, "b"), seq(2, "c")
    for x in (a, b):
        s.add(x)
    plan = s.schedule()
    assert [(p.seq, p.start, p.end) for p in plan.prefill] == [(a, 0, 3), (b, 0, 5)]  # budget 8 shared
    a.num_computed, b.num_computed = 3, 5
    s.add(c)
    plan = s.schedule()
    assert plan.decode == [a] and [(p.seq, p.start, p.end) for p in plan.prefill] == [(b, 5, 13)]
    assert c in s.waiting  # max_batch sequences run already
    held = s.blocks.in_use
    s.finish(a, "stop")
    assert s.blocks.in_use < held or held == 0  # a's blocks are back at once
    b.num_computed = 13
    plan = s.schedule()
    assert c in s.running  # c runs in the very next step
    assert [(p.seq, p.start, p.end) for p in plan.prefill] == [(b, 13, 20), (c, 0, 1)]


def test_scheduler_queue_bound():
    s = Scheduler(max_batch=1, max_queue=1, blocks=BlockManager(8, 4))
    s.add(seq(1, "a"))
    with pytest.raises(QueueFull):
        s.add(seq(1, "b"))
    s.schedule()  # a runs, the queue has room again
    s.add(seq(1, "b"))


def accepts(grammar: Grammar, text: str) -> bool:
    state = grammar.initial()
    for ch in text:
        state = grammar.step(state, ch)
        if not state:
            return False
    return grammar.complete(state)


SCHEMA = {"type": "object", "$defs": {"tag": {"enum": ["a", "b"]}},
          "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 4}, "n": {"type": "integer"},
                         "x": {"type": ["number", "null"]}, "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"},
                                                                     "maxItems": 2},
                         "ok": {"type": "boolean"}},
          "required": ["name", "n"]}


@pytest.mark.parametrize("text", ['{"name":"ab","n":-12}', '{"name": "a\\"b", "n": 0, "x": null}',
                                  '{"name":"abcd","n":3,"x":1.5e-3,"tags":["a","b"],"ok":true}',
                                  '{"name":"\\u00e9","n":1,"ok":false}'])
def test_grammar_accepts_valid(text):
    jsonschema.validate(json.loads(text), SCHEMA)
    assert accepts(Grammar(SCHEMA), text)


@pytest.mark.parametrize("text", ['{"n":1,"name":"a"}', '{"name":"","n":1}', '{"name":"abcde","n":1}',
                                  '{"name":"a","n":1.5}', '{"name":"a","n":01}', '{"name":"a"}',
                                  '{"name":"a","n":1,"tags":["c"]}', '{"name":"a","n":1,"tags":["a","a","b"]}',
                                  '{"name":"a","n":1,"zzz":1}', '{"name":"a","n":1}  '])
def test_grammar_rejects_invalid(text):
    assert not accepts(Grammar(SCHEMA), text)


def test_grammar_json_object_and_unsupported():
    g = Grammar(None)
    assert accepts(g, '{"a": [1, {"b": null}], "c": "d"}') and not accepts(g, "[1]") and not accepts(g, '{"a":}')
    for bad in ({"type": "string", "pattern": "a+"}, {"type": "integer", "minimum": 3}, {"$ref": "http://x"}):
        with pytest.raises(UnsupportedSchema):
            Grammar(bad)


def test_metrics_render():
    m = Metrics()
    m.inc("herd_requests_total", finish_reason="stop")
    m.observe_ttft(0.2)
    text = m.render()
    assert 'herd_requests_total{finish_reason="stop"} 1' in text
    assert 'herd_time_to_first_token_seconds_bucket{le="0.25"} 1' in text


def test_engine_matches_generator_with_mixed_params(smollm2):
    """Greedy and seeded rows decode together; each equals LLM.generate run alone with the same settings."""
    engine = Engine(smollm2.model, smollm2.tokenizer, max_batch=3, context=128, prefill_budget=4)
    cases = {"greedy": ("The capital of France is", SamplingParams(temperature=0)),
             "seeded": ("Once upon a time", SamplingParams(temperature=0.9, top_p=0.9, seed=5)),
             "penalized": ("I like cats. I like", SamplingParams(temperature=0, frequency_penalty=1.5))}
    for rid, (prompt, params) in cases.items():
        engine.add_request(Request(rid, smollm2.tokenizer.encode(prompt), 8, params, frozenset(smollm2.stop_ids)))
    texts = dict.fromkeys(cases, "")
    for _ in range(100):  # bounded
        if not engine.has_work():
            break
        for out in engine.step():
            texts[out.request_id] += out.text
    for rid, (prompt, params) in cases.items():
        kw = {k: getattr(params, k) for k in ("temperature", "top_p", "seed", "frequency_penalty")}
        assert texts[rid] == smollm2.generate(prompt, max_tokens=8, **kw).text, rid
    assert not engine.scheduler.running and engine.blocks.in_use == 0 and engine.blocks.reserved == 0


def test_prompt_logprobs_across_prefill_chunks(smollm2):
    """Prompt logprobs computed chunk by chunk (3 tokens a step) equal one full forward's log-softmax."""
    import torch

    ids = smollm2.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    engine = Engine(smollm2.model, smollm2.tokenizer, max_batch=1, context=64, prefill_budget=3)
    engine.add_request(Request("p", ids, max_tokens=0, prompt_logprobs=1))
    outs = [o for _ in range(20) if engine.has_work() for o in engine.step()]
    assert len(outs) == 1 and outs[0].finish_reason == "length" and outs[0].completion_tokens == 0
    got = outs[0].prompt_logprobs
    ref = torch.log_softmax(smollm2.logits(ids), dim=-1)
    assert got[0] is None and len(got) == len(ids)
    for i in range(1, len(ids)):
        assert got[i].token_id == ids[i] and got[i].logprob == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
        assert got[i].top[0][0] == int(ref[i - 1].argmax())
