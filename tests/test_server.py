"""The OpenAI-compatible server on SmolLM2, driven by the official `openai` client over loopback.

One in-process server for the module (16 sequences of up to 512 tokens). Expected values come from
independent paths: LLM.chat / LLM.generate (the single-request generator), a full forward's
log-softmax for logprobs, jsonschema for constrained output.
"""

from __future__ import annotations

import http.client as hc
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
import torch

from herd.server import create_app
from tests.fixtures.serving import ServerThread, http, metric

MODEL = "smollm2-135m"
PROMPTS = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
           "What is 2 + 2?", "Say hello in Spanish.", "Give me a fruit.", "What do cats eat?", "Tell me a joke."]


@pytest.fixture(scope="module")
def server(smollm2):
    app = create_app(smollm2, max_batch=16, context=512, max_queue=64, model_id=MODEL, aliases={"smollm2"})
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)


def chat(client, prompt, **kw):
    kw = {"model": MODEL, "max_tokens": 10, "temperature": 0, **kw}
    return client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw)


def user(prompt):
    return [{"role": "user", "content": prompt}]


@pytest.fixture(scope="module")
def expected(smollm2):
    """Greedy replies from the single-request generator (LLM.chat), 8 tokens each."""
    return {p: smollm2.chat(user(p), max_tokens=8, temperature=0).text for p in PROMPTS}


def test_models_health_tokenize(server, client, smollm2):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert http("GET", server.url + "/health") == (200, {"status": "ok"})
    status, body = http("POST", server.url + "/tokenize", {"prompt": "Hello world"})
    assert status == 200 and body["tokens"] == smollm2.tokenizer.encode("Hello world") and body["count"] == 2
    status, body = http("POST", server.url + "/tokenize", {"model": MODEL, "messages": user("Hi")})
    assert body["tokens"] == smollm2.chat_prompt(user("Hi"))
    assert http("POST", server.url + "/detokenize", {"tokens": body["tokens"][:3]})[1]["prompt"] == \
        smollm2.tokenizer.decode(body["tokens"][:3])


def test_chat_matches_generator(client, smollm2, expected):
    reply = chat(client, PROMPTS[0], max_tokens=8)
    assert reply.choices[0].message.content == expected[PROMPTS[0]]
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(smollm2.chat_prompt(user(PROMPTS[0])))
    assert reply.usage.completion_tokens <= 8 and reply.usage.total_tokens == reply.usage.prompt_tokens + \
        reply.usage.completion_tokens
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert chat(client, PROMPTS[0], model="smollm2").choices[0].message.content  # an alias works too


def test_chat_stream_with_usage(client, expected):
    chunks = list(chat(client, PROMPTS[1], max_tokens=8, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected[PROMPTS[1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 8
    assert len({c.id for c in chunks}) == 1


def test_a_repeated_prefix_is_served_from_the_cache(server, client, smollm2):
    """The second turn of a chat computes only its new tokens: OpenAI's usage says how many prompt tokens
    were cached, /metrics counts the hits, and the answer is the single-request generator's."""
    from tests.fixtures.serving import http, metric

    system = {"role": "system", "content": "You are a patient teacher of geography. " * 12}
    first = [system, {"role": "user", "content": "Name a river."}]
    r1 = client.chat.completions.create(model=MODEL, messages=first, max_tokens=6, temperature=0)
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "Name a mountain."}]
    r2 = client.chat.completions.create(model=MODEL, messages=second, max_tokens=6, temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= 96 and cached % 16 == 0 and cached < r2.usage.prompt_tokens
    assert r2.choices[0].message.content == smollm2.chat(second, max_tokens=6, temperature=0).text
    _, text = http("GET", server.url + "/metrics")
    assert metric(text, "herd_prefix_cache_hits_total") >= cached


def test_completion_echo_prompt_logprobs(client, smollm2):
    """echo + logprobs with max_tokens 0 and 1 (multiple-choice evaluation): the prompt's logprobs equal a
    full forward's log-softmax; the first token has none."""
    prompt = "The capital of France is Paris"
    ids = smollm2.tokenizer.encode(prompt)
    ref = torch.log_softmax(smollm2.logits(ids), dim=-1)
    for max_tokens in (0, 1):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, echo=True, logprobs=2,
                                      temperature=0)
        lp = r.choices[0].logprobs
        assert r.choices[0].text.startswith(prompt) and len(lp.tokens) == len(ids) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for i in range(1, len(ids)):
            assert lp.token_logprobs[i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-3)
            assert len(lp.top_logprobs[i]) >= 2
        assert lp.text_offset[1] == len(smollm2.tokenizer.decode(ids[:1]))
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == max_tokens
    if max_tokens == 1:  # the generated token's logprob comes from the last prompt position
        assert lp.token_logprobs[-1] == pytest.approx(ref[-1].max().item(), abs=1e-3)


def test_completion_logprobs_stop_and_token_prompt(client, smollm2):
    ids = smollm2.tokenizer.encode("Once upon a time")
    full = smollm2.generate(ids, max_tokens=10, temperature=0, logprobs=1)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0, logprobs=1)
    assert r.choices[0].text == full.text
    got = r.choices[0].logprobs.token_logprobs
    assert got == pytest.approx([x.logprob for x in full.logprobs], abs=1e-3)
    stop = full.text[4:8]
    cut = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].text == full.text[: full.text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full.text


def test_chat_logprobs(client, smollm2):
    r = chat(client, PROMPTS[3], max_tokens=4, logprobs=True, top_logprobs=3)
    ids = smollm2.chat_prompt(user(PROMPTS[3]))
    content = r.choices[0].logprobs.content
    ref = torch.log_softmax(smollm2.logits(ids), dim=-1)[-1]
    assert content[0].logprob == pytest.approx(ref.max().item(), abs=1e-3)
    assert len(content[0].top_logprobs) == 3 and content[0].top_logprobs[0].token == content[0].token
    assert bytes(content[0].bytes).decode() == content[0].token
    chunks = list(chat(client, PROMPTS[3], max_tokens=4, logprobs=True, top_logprobs=3, stream=True))
    streamed = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.content]
    assert [(x.token, round(x.logprob, 4)) for x in streamed] == [(x.token, round(x.logprob, 4)) for x in content]


def test_seed_n_and_penalties(client):
    kw = dict(max_tokens=8, temperature=1.0, top_p=0.95, seed=11, n=2)
    a, b = chat(client, PROMPTS[2], **kw), chat(client, PROMPTS[2], **kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]
    assert a.usage.completion_tokens > 8 or all(c.finish_reason == "stop" for c in a.choices)  # both counted
    penalized = chat(client, PROMPTS[2], max_tokens=8, presence_penalty=2.0, frequency_penalty=2.0)
    assert penalized.choices[0].message.content


def test_logit_bias_forces_a_token(client, smollm2):
    forced = smollm2.tokenizer.encode(" banana")[0]
    r = client.completions.create(model=MODEL, prompt="I like", max_tokens=3, temperature=0,
                                  logit_bias={str(forced): 100})
    assert r.choices[0].text == smollm2.tokenizer.decode([forced] * 3)


def test_json_schema_and_json_object(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer"},
                                               "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                        "maxItems": 2}},
              "required": ["name", "age"]}
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    r = chat(client, "Describe a person as JSON.", max_tokens=60, response_format=rf)
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    assert r.choices[0].finish_reason == "stop"
    stream = chat(client, "Describe a person as JSON.", max_tokens=60, response_format=rf, stream=True,
                  temperature=0.8, seed=3)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in stream)), schema)
    r = chat(client, "Give me a JSON object with a greeting.", max_tokens=60, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: a prefix of an object
        assert r.choices[0].message.content.startswith("{")


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
    "zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}


def test_tool_choice_required_and_named(client):
    r = chat(client, "What's the weather in Paris?", max_tokens=40, tools=[WEATHER, TIME], tool_choice="required")
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and calls and r.choices[0].message.content is None
    for call in calls:
        assert call.function.name in ("get_weather", "get_time") and call.id.startswith("call_")
        schema = (WEATHER if call.function.name == "get_weather" else TIME)["function"]["parameters"]
        jsonschema.validate(json.loads(call.function.arguments), schema)
    named = {"type": "function", "function": {"name": "get_time"}}
    r = chat(client, "What time is it?", max_tokens=20, tools=[WEATHER, TIME], tool_choice=named)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), TIME["function"]["parameters"])
    chunks = list(chat(client, "What time is it?", max_tokens=20, tools=[WEATHER, TIME], tool_choice=named,
                       stream=True))
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_time" and deltas[0].id
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_errors(server, client):
    def status_of(fn):
        with pytest.raises(openai.APIStatusError) as e:
            fn()
        body = e.value.body
        assert set(body) >= {"message", "type", "param", "code"}, body
        return e.value.status_code, body

    assert status_of(lambda: chat(client, "hi", model="gpt-4"))[0] == 404
    assert status_of(lambda: chat(client, "hi", temperature=3))[0] == 400
    assert status_of(lambda: chat(client, "hi", n=0))[0] == 400
    assert status_of(lambda: client.chat.completions.create(model=MODEL, messages=[]))[0] == 400
    assert status_of(lambda: chat(client, "hi", top_logprobs=2))[0] == 400  # needs logprobs: true
    code, body = status_of(lambda: chat(client, "word " * 600))
    assert code == 400 and body["code"] == "context_length_exceeded" and "512" in body["message"]
    assert status_of(lambda: chat(client, "hi", max_tokens=600))[0] == 400
    assert status_of(lambda: chat(client, "hi", tool_choice="required"))[0] == 400  # no tools
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "^a"}}}
    code, body = status_of(lambda: chat(client, "hi", response_format=bad_schema))
    assert code == 400 and "pattern" in body["message"]
    assert status_of(lambda: client.completions.create(model=MODEL, prompt=[10**9], max_tokens=1))[0] == 400
    assert status_of(lambda: chat(client, "hi", logit_bias={"99999999": 5}))[0] == 400
    assert status_of(lambda: client.completions.create(model=MODEL, prompt="x", suffix="y"))[0] == 400
    status, body = http("POST", server.url + "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = http("GET", server.url + "/v1/nothing")
    assert status == 404 and "error" in body
    assert http("GET", server.url + "/health")[0] == 200


def test_queue_full_is_429(server, client):
    engine = server.engine
    engine.max_queue = 0  # every new request would wait: the bound is reached at once
    try:
        with pytest.raises(openai.RateLimitError) as e:
            chat(client, "hi")
        assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
    finally:
        engine.max_queue = 64
    assert chat(client, "hi", max_tokens=2).choices[0].message.content is not None


def test_engine_failure_is_500_and_server_survives(server, client):
    runner = server.engine.engine.runner
    original = runner.sample

    def broken(ready):
        runner.sample = original
        raise RuntimeError("injected failure")

    runner.sample = broken
    with pytest.raises(openai.InternalServerError) as e:
        chat(client, "hi")
    assert e.value.status_code == 500 and "injected failure" in e.value.body["message"]
    assert chat(client, "hi", max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_disconnect_frees_slot(server):
    """Read two events of a long stream, drop the connection: the request is aborted and its slot freed."""
    before = metric(http("GET", server.url + "/metrics")[1], "herd_requests_total", finish_reason="abort")
    conn = hc.HTTPConnection("127.0.0.1", server.port, timeout=300)
    body = {"model": MODEL, "messages": user("Tell me a very long story."), "max_tokens": 400, "stream": True,
            "temperature": 0}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    events = 0
    while events < 3:  # role chunk + two content chunks
        line = resp.fp.readline()
        events += line.startswith(b"data: ")
    conn.sock.shutdown(2)
    conn.close()
    for _ in range(600):  # bounded wait for the abort to land (at most 60 s)
        text = http("GET", server.url + "/metrics")[1]
        if metric(text, "herd_requests_total", finish_reason="abort") > before:
            break
        time.sleep(0.1)
    assert metric(text, "herd_requests_total", finish_reason="abort") == before + 1
    scheduler = server.engine.engine.scheduler
    assert not scheduler.running and scheduler.blocks.in_use == 0 and scheduler.blocks.reserved == 0


def test_batch_equivalence(client):
    """8 different prompts sent at once give the same greedy text as sent one by one."""
    one_by_one = [chat(client, p, max_tokens=16).choices[0].message.content for p in PROMPTS]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: chat(client, p, max_tokens=16).choices[0].message.content, PROMPTS))
    assert together == one_by_one


def test_load_32_streaming_clients(server, client, expected):
    """64 streaming requests from 32 concurrent clients: every stream completes, unmixed; /metrics counts them."""
    metrics_before = http("GET", server.url + "/metrics")[1]
    base = metric(metrics_before, "herd_http_requests_total", endpoint="/v1/chat/completions", status=200)
    gen_before = metric(metrics_before, "herd_generation_tokens_total")
    lock = threading.Lock()
    results = []

    def run(i):
        prompt = PROMPTS[i % len(PROMPTS)]
        stream = chat(client, prompt, max_tokens=8, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        with lock:
            results.append((prompt, chunks))

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(run, range(64)))
    assert len(results) == 64
    total_tokens = 0
    for prompt, chunks in results:
        assert len({c.id for c in chunks}) == 1, "a stream mixed two requests"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected[prompt]
        assert chunks[-1].usage is not None and chunks[-2].choices[0].finish_reason in ("stop", "length")
        total_tokens += chunks[-1].usage.completion_tokens
    for _ in range(100):  # responses are counted as they close, just after the client saw [DONE]
        after = http("GET", server.url + "/metrics")[1]
        if metric(after, "herd_http_requests_total", endpoint="/v1/chat/completions", status=200) >= base + 64:
            break
        time.sleep(0.1)
    assert metric(after, "herd_http_requests_total", endpoint="/v1/chat/completions", status=200) == base + 64
    assert metric(after, "herd_generation_tokens_total") - gen_before == total_tokens
    assert metric(after, "herd_time_to_first_token_seconds_count") >= 64
    assert metric(after, "herd_queue_length") == 0
    assert http("GET", server.url + "/health")[0] == 200
