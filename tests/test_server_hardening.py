"""The server against hostile or careless clients (issue 11, items 3, 4, 5 and 10): large bodies,
malformed requests, huge enums, content parts and unknown roles, slow and vanishing connections.

Two in-process servers on SmolLM2: `server` with herd's defaults (8 MiB bodies), and `roomy` with a
32 MiB body limit (so a 10 MB prompt reaches the handlers) and short header / body deadlines.
"""

from __future__ import annotations

import json
import logging
import socket
import time

import openai
import pytest

from herd.server import create_app
from tests.fixtures.serving import ServerThread, closed_by_server, health_latencies, http, raw_response

MODEL = "smol"


@pytest.fixture(scope="module")
def server(smollm2):
    with ServerThread(create_app(smollm2, max_batch=4, context=512, model_id=MODEL)) as srv:
        yield srv


@pytest.fixture(scope="module")
def roomy(smollm2):
    app = create_app(smollm2, max_batch=4, context=512, model_id=MODEL, max_body_bytes=32 << 20,
                     header_timeout=1.0, body_timeout=2.0)
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def connect(srv) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=10)


def chat_body(content, **kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0,
            **kw}


def schema_body(schema, **kw):
    return chat_body("Pick one.", response_format={"type": "json_schema",
                                                   "json_schema": {"name": "x", "schema": schema}}, **kw)


def error_of(status_body, status=400):
    status_, body = status_body
    assert status_ == status, body
    assert isinstance(body, dict) and set(body["error"]) >= {"message", "type", "param", "code"}, body
    return body["error"]


# -- item 3: large requests -------------------------------------------------------------------------------------

def test_body_over_the_default_limit_gets_413_before_it_is_read(server):
    with connect(server) as s:  # announce 10 MB, send 1 KB: the answer must not wait for the rest
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 10000000\r\n\r\n" + b" " * 1024)
        status, data = raw_response(s, timeout=10)
    assert status == 413, data[:300]
    assert b"8,388,608 bytes" in data and b"connection: close" in data.lower()
    with connect(server) as s:  # chunked: no length up front, counted as it arrives
        s.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
        for _ in range(9):
            s.sendall(chunk)
        status, data = raw_response(s, timeout=10)
    assert status == 413, data[:300]
    assert http("GET", server.url + "/health", timeout=5) == (200, {"status": "ok"})


def test_large_prompts_do_not_block_health(roomy):
    text = "The quick brown fox jumps over the lazy dog. " * (10_000_000 // 45)  # 10 MB
    latencies, (status, body) = health_latencies(
        roomy, lambda: http("POST", roomy.url + "/tokenize", {"prompt": text}, timeout=300))
    assert status == 200 and body["count"] > 1_000_000, str(body)[:300]
    assert len(latencies) >= 3 and max(latencies) < 1.0, latencies

    chat = chat_body(text[:3_000_000])  # template rendering and tokenizing, then too long for the context
    latencies, (status, body) = health_latencies(
        roomy, lambda: http("POST", roomy.url + "/v1/chat/completions", chat, timeout=300))
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", str(body)[:300]
    assert len(latencies) >= 2 and max(latencies) < 1.0, latencies

    completion = {"model": MODEL, "prompt": text[:3_000_000], "max_tokens": 1}
    latencies, (status, body) = health_latencies(
        roomy, lambda: http("POST", roomy.url + "/v1/completions", completion, timeout=300))
    assert status == 400 and body["error"]["param"] == "prompt", str(body)[:300]
    assert len(latencies) >= 2 and max(latencies) < 1.0, latencies


# -- item 4: client errors are 400s naming the field ------------------------------------------------------------

@pytest.mark.parametrize("schema, words", [
    ({"$ref": "#"}, ["'#'", "itself"]),
    ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, ["#/$defs/a -> #/$defs/a"]),
    ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
     ["#/$defs/a -> #/$defs/b -> #/$defs/a"]),
    ({"anyOf": []}, ["anyOf", "non-empty"]),
    ({"type": "array", "minItems": 5, "maxItems": 1}, ["minItems 5", "maxItems 1"]),
    ({"type": "object", "properties": {"a": {"anyOf": [{"$ref": "#"}]}}, "required": ["a"]}, ["no finite"]),
])
def test_unsatisfiable_schemas_are_400_naming_response_format(server, schema, words):
    err = error_of(http("POST", server.url + "/v1/chat/completions", schema_body(schema), timeout=60))
    assert err["param"] == "response_format", err
    assert all(w in err["message"] for w in words), err


def test_seed_out_of_range_is_400_naming_seed(server):
    for path, body in (("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "seed": 2**70}),
                       ("/v1/chat/completions", chat_body("Hi", seed=-(2**70)))):
        err = error_of(http("POST", server.url + path, body, timeout=60))
        assert err["param"] == "seed" and "seed" in err["message"], err


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"model": MODEL, "prompt": "\ud800abc", "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["fine", "\ud800abc"], "max_tokens": 2}, "prompt"),
    ("/v1/chat/completions", chat_body("\ud800abc"), "messages"),
    ("/v1/chat/completions", chat_body([{"type": "text", "text": "\udfffx"}]), "messages"),
    ("/tokenize", {"prompt": "\ud800abc"}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "\ud800abc"}]}, "messages"),
    # issue 23 item 12: a model name that is not valid Unicode was a 500 (the "does not exist" answer quoted it)
    ("/v1/chat/completions", chat_body("Hi", model="\ud800"), "model"),
    ("/v1/completions", {"model": "x\udfff", "prompt": "Hi", "max_tokens": 2}, "model"),
    ("/tokenize", {"model": "\ud800", "prompt": "Hi"}, "model"),
    ("/detokenize", {"model": "\ud800", "tokens": [1]}, "model"),
])
def test_lone_surrogates_are_400_naming_the_field(server, path, body, param):
    assert "\\ud800" in json.dumps(body) or "\\udfff" in json.dumps(body)  # sent as JSON's escape
    err = error_of(http("POST", server.url + path, body, timeout=60))
    assert err["param"] == param, err
    assert "not valid Unicode" in err["message"] and "lone surrogate" in err["message"], err


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": "f"}, {"type": "function", "function": ["f"]},
                                         {"type": "function", "function": {"name": 5}}, {"function": 7}])
def test_malformed_tool_choice_is_400_naming_it(server, tool_choice):
    """Issue 23 item 12: tool_choice.function given as a string (or anything but an object with a name) was a 500."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    err = error_of(http("POST", server.url + "/v1/chat/completions",
                        chat_body("Hi", tools=tools, tool_choice=tool_choice), timeout=60))
    assert err["param"] == "tool_choice" and '"function": {"name": NAME}' in err["message"], err


# -- item 5: large enums ----------------------------------------------------------------------------------------

def test_large_enum_compiles_and_decodes_quickly(server):
    values = [f"item-{i:06d}" for i in range(100_000)]
    # the deadline is the request's timeout: the old linear scan never answered within 60 s
    status, body = http("POST", server.url + "/v1/chat/completions", schema_body({"enum": values}, max_tokens=16),
                        timeout=60)
    assert status == 200, body
    choice = body["choices"][0]  # '"item-012345"' is about ten tokens: it finishes within 16
    assert choice["finish_reason"] == "stop" and json.loads(choice["message"]["content"]) in values, choice

    err = error_of(http("POST", server.url + "/v1/chat/completions",
                        schema_body({"enum": values + ["one-too-many"]}), timeout=60))
    assert err["param"] == "response_format" and "100,000" in err["message"], err


# -- item 10: OpenAI compatibility and connections --------------------------------------------------------------

def test_text_content_parts_are_accepted(server, client, smollm2):
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": " of France?"}]
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content":
                                                                   "What is the capital of France?"}],
                                           max_tokens=6, temperature=0)
    got = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": [
        {"type": "text", "text": "You are brief."}]}, {"role": "user", "content": parts}], max_tokens=6,
        temperature=0)
    assert got.choices[0].message.content
    same = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}],
                                          max_tokens=6, temperature=0)
    assert same.choices[0].message.content == plain.choices[0].message.content
    ids = http("POST", server.url + "/tokenize", {"messages": [{"role": "user", "content": parts}]})[1]["tokens"]
    assert ids == smollm2.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    assert smollm2.chat([{"role": "user", "content": parts}], max_tokens=6, temperature=0).text == \
        plain.choices[0].message.content

    err = error_of(http("POST", server.url + "/v1/chat/completions", chat_body(
        [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}])))
    assert err["param"] == "messages" and "image_url" in err["message"] and "text only" in err["message"], err


def test_unknown_role_is_refused(server):
    body = chat_body("hi")
    body["messages"] = [{"role": "hacker", "content": "hi"}]
    err = error_of(http("POST", server.url + "/v1/chat/completions", body))
    assert err["param"] == "messages" and "'hacker'" in err["message"], err
    err = error_of(http("POST", server.url + "/tokenize", {"messages": body["messages"]}))
    assert err["param"] == "messages" and "'hacker'" in err["message"], err


def test_slow_headers_are_cut_off(roomy):
    socks = [connect(roomy) for _ in range(40)]
    silent = [connect(roomy) for _ in range(5)]  # connected, never a byte
    try:
        for s in socks:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        start, open_ = time.monotonic(), set(range(40))
        while open_ and time.monotonic() - start < 8:
            for i in list(open_):
                try:
                    socks[i].sendall(b"X-Slow: %d\r\n" % i)  # trickles on, never finishing the headers
                except OSError:
                    open_.discard(i)
                    continue
                if closed_by_server(socks[i]):
                    open_.discard(i)
            assert http("GET", roomy.url + "/health", timeout=5)[0] == 200
            time.sleep(0.25)
        assert not open_, f"{len(open_)} of 40 slow connections still open after {time.monotonic() - start:.1f} s"
        assert all(closed_by_server(s) for s in silent)
    finally:
        for s in socks + silent:
            s.close()


def test_slow_body_gets_408(roomy):
    with connect(roomy) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\": ")
        start = time.monotonic()
        status, data = None, b""
        while time.monotonic() - start < 8:
            try:
                s.sendall(b" ")
            except OSError:
                break
            status, data = raw_response(s, timeout=0.3)
            if status is not None:
                break
    assert status == 408, data[:300]
    assert time.monotonic() - start < 5
    assert http("GET", roomy.url + "/health", timeout=5)[0] == 200


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_disconnect_from_non_streaming_request_is_one_line(server):
    records = Records()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "herd.server")]
    herd_log = loggers[1]
    level = herd_log.level
    herd_log.setLevel(logging.INFO)
    for lg in loggers:
        lg.addHandler(records)
    try:
        body = json.dumps(chat_body("Write a long story about a dragon.", max_tokens=400)).encode()
        with connect(server) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(1.0)  # generating
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("disconnected" in r.getMessage() for r in records.records):
            time.sleep(0.1)
        time.sleep(0.5)  # anything logged right after
    finally:
        for lg in loggers:
            lg.removeHandler(records)
        herd_log.setLevel(level)
    assert not [r for r in records.records if r.exc_info or r.levelno >= logging.ERROR], \
        [r.getMessage() for r in records.records]
    lines = [r for r in records.records if "disconnected" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and "/v1/chat/completions" in lines[0].getMessage()
    assert http("GET", server.url + "/health", timeout=5)[0] == 200
