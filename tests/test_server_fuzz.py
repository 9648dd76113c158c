"""A seeded fuzz of the OpenAI endpoints (issue 23, item 12): a few hundred malformed bodies for
/v1/chat/completions, /v1/completions, /tokenize and /detokenize (wrong types, lone surrogates, deep JSON, huge
numbers, NaN and infinities, strings where objects belong, missing fields, broken JSON). Each gets a 4xx in
OpenAI's error shape, or a 200 where the mutation left a valid request; never a 500 and never a hang."""

from __future__ import annotations

import json
import random

import pytest

from herd.server import create_app
from tests.fixtures.serving import ServerThread, http

MODEL = "smol"
SEED, CASES = 2323, 320
# JSON tokens Python's json module reads but json.dumps cannot write as such
NAN, INF, NEG_INF, HUGE = "NaN", "Infinity", "-Infinity", "1" + "0" * 400


class Raw(str):
    """A JSON token written as it is."""


HOSTILE = [2**70, -(2**70), 1e308, Raw(NAN), Raw(INF), Raw(NEG_INF), Raw(HUGE), "\ud800", "a\udfffb", {"\ud800": 1},
           "", "text", [], {}, None, True, 0, -1, 1.5, [None, 1, "x"], {"type": "function", "function": "f"},
           [[[[]]]], {"a": [1]}]


def bases() -> dict[str, dict]:
    """A valid body per endpoint, each field a place to break (names after '#' tell two chat bodies apart)."""
    tool = {"type": "function", "function": {"name": "f", "description": "d",
                                             "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}
    return {
        "/v1/chat/completions": {
            "model": MODEL, "max_tokens": 1, "temperature": 0, "messages": [
                {"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "tools": [tool], "tool_choice": "none", "logit_bias": {"5": 1.0}, "stop": ["x"], "seed": 1,
            "response_format": {"type": "text"}, "stream_options": {"include_usage": True}, "logprobs": False},
        "/v1/chat/completions#history": {
            "model": MODEL, "max_tokens": 1, "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "3"},
                {"role": "user", "content": [{"type": "text", "text": "ok"},
                                             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}],
            "tools": [tool], "tool_choice": {"type": "function", "function": {"name": "f"}},
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
        "/v1/completions": {"model": MODEL, "prompt": ["Hello", "Hi"], "max_tokens": 1, "temperature": 0,
                            "logprobs": 1, "echo": False, "stop": "x", "logit_bias": {"5": 1.0}, "seed": 1, "n": 1},
        "/tokenize": {"model": MODEL, "prompt": "Hello", "add_special_tokens": True},
        "/tokenize#messages": {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}]},
        "/detokenize": {"model": MODEL, "tokens": [1, 2, 3]},
    }


def places(value, at=()):
    """Every path into a JSON value."""
    yield at
    if isinstance(value, dict):
        for k, v in value.items():
            yield from places(v, at + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from places(v, at + (i,))


def mutated(body: dict, rng: random.Random) -> dict:
    """`body` with one or two fields replaced by a hostile value, or removed."""
    for _ in range(rng.choice([1, 1, 2])):
        at = rng.choice([p for p in places(body) if p])
        parent = body
        for key in at[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and rng.random() < 0.15:
            del parent[at[-1]]
        else:
            parent[at[-1]] = rng.choice(HOSTILE)
    return body


def encode(value) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(k) + ":" + encode(v) for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(encode(v) for v in value) + "]"
    return json.dumps(value)  # lone surrogates as JSON's \ud800 escapes


def cases() -> list[tuple[str, bytes]]:
    rng = random.Random(SEED)
    names = list(bases())
    out = []
    for i in range(CASES):
        name = names[i % len(names)]
        body = bases()[name]
        roll = rng.random()
        if roll < 0.06:  # deep JSON, alone or where messages belong
            depth = rng.choice([1_000, 100_000])
            deep = "[" * depth + "]" * depth if rng.random() < 0.5 else '{"a":' * depth + "1" + "}" * depth
            text = deep if rng.random() < 0.5 else json.dumps(body)[:-1] + ', "messages": ' + deep + "}"
            out.append((name, text.encode()))
        elif roll < 0.12:  # not a JSON object at all
            out.append((name, rng.choice([b"", b"{", b"not json", b"\xff\xfe{}", b"[]", b"\"x\"", b"1", b"null",
                                          b"{\"model\": \"\xed\xa0\x80\"}", json.dumps(body).encode()[:-3]])))
        else:
            out.append((name, encode(mutated(body, rng)).encode()))
    return out


@pytest.fixture(scope="module")
def server(smollm2):
    # a short context bounds any generation a mutation leaves valid (max_tokens null: up to the context)
    with ServerThread(create_app(smollm2, max_batch=4, context=64, model_id=MODEL)) as srv:
        yield srv


def test_malformed_requests_get_4xx_in_openai_shape(server):
    statuses = []
    for name, raw in cases():
        path = name.split("#")[0]
        status, body = http("POST", server.url + path, raw, timeout=120)  # a hang fails here
        statuses.append(status)
        assert status < 500, (path, raw[:300], body)
        if status >= 400:
            assert isinstance(body, dict) and isinstance(body.get("error"), dict), (path, raw[:300], body)
            error = body["error"]
            assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str) \
                and error["message"] and isinstance(error["type"], str), (path, raw[:300], body)
    assert sum(400 <= s < 500 for s in statuses) > 0.75 * len(statuses), statuses
    assert http("GET", server.url + "/health", timeout=5) == (200, {"status": "ok"})
