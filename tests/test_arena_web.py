"""The arena's HTTP app with scripted contestants (instant, known answers): the battle flow, anonymity
until the vote, and every refusal the issue lists, on SQLite and on a real PostgreSQL server. Real models
fight in tests/test_arena_browser.py.

Checked from outside: an httpx client over a real loopback server, and the database read back.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from herd.arena.config import ArenaConfig
from herd.arena.contestants import Contestant, EndpointContestant
from herd.arena.service import Arena
from herd.arena.store import Store
from herd.arena.web import create_arena_app
from herd.errors import HerdError
from tests.fixtures.serving import ServerThread
from tests.test_arena_store import db_url, pg_server  # noqa: F401  (fixtures: SQLite and PostgreSQL)


class Scripted(Contestant):
    kind, verified = "local", True

    def __init__(self, name, fingerprint, words, weight=1.0):
        self.name, self.fingerprint, self.words, self.weight, self.source = name, fingerprint, words, weight, "test"

    async def stream(self, messages, sampling, max_tokens, answer):
        turn = sum(1 for m in messages if m["role"] == "user")
        for word in self.words + [f" (turn {turn})"]:
            answer.text += word
            answer.tokens += 1
            yield word


def make_arena(tmp_path, url=None, **overrides):
    config = ArenaConfig(secret="s3cret", admin_key="adm1n", battles_per_minute=1000, votes_per_minute=1000,
                         bootstrap_rounds=20, **overrides)
    arena = Arena(Store(url or f"sqlite:///{tmp_path / 'arena.db'}"), sampling=config.sampling, max_tokens=32,
                  provisional_votes=config.provisional_votes, bootstrap_rounds=config.bootstrap_rounds)
    arena.enter(Scripted("alpha-model", "a" * 64, ["Hello", " from", " one"]))
    arena.enter(Scripted("beta-model", "b" * 64, ["Greetings", " from", " two"]))
    return arena, config


def builder(spec: dict):
    return Scripted(spec["name"], spec["model"] * 64, ["new", " weights"])


@pytest.fixture
def served(tmp_path, db_url):  # noqa: F811
    arena, config = make_arena(tmp_path, db_url)
    with ServerThread(create_arena_app(arena, config, spec_builder=builder)) as server:
        yield server, arena


class Browser:
    """A client that keeps its session cookie and sends the page's CSRF token, as the page's script does."""

    def __init__(self, url):
        self.client = httpx.Client(base_url=url, timeout=60)
        self.page = self.client.get("/").text
        self.csrf = re.search(r'name="csrf" content="([^"]+)"', self.page).group(1)

    def post(self, path, body, csrf=True, **kw):
        headers = {"X-CSRF-Token": self.csrf} if csrf else {}
        return self.client.post(path, json=body, headers=headers, **kw)

    def battle(self, prompt="Say hi", token=None):
        path, body = ("/api/battle/turn", {"token": token, "prompt": prompt}) if token else ("/api/battle",
                                                                                            {"prompt": prompt})
        r = self.post(path, body)
        if r.status_code != 200:
            return r, None, None
        events = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: ")]
        token = token or next(e["token"] for e in events if e["type"] == "battle")
        return r, token, events


def test_battle_names_stay_hidden_until_the_vote(served):
    server, arena = served
    b = Browser(server.url)
    assert "alpha-model" not in b.page and "beta-model" not in b.page
    r, token, events = b.battle()
    assert "alpha-model" not in r.text and "beta-model" not in r.text and "a" * 64 not in r.text
    texts = {s: "".join(e["text"] for e in events if e["type"] == "delta" and e["side"] == s) for s in "ab"}
    assert sorted(texts.values()) == ["Greetings from two (turn 1)", "Hello from one (turn 1)"]
    assert events[-1] == {"type": "end"}
    vote = b.post("/api/vote", {"token": token, "winner": "a"})
    assert vote.status_code == 200
    shown = vote.json()
    assert {shown["a"]["name"], shown["b"]["name"]} == {"alpha-model", "beta-model"}
    assert texts["a"].startswith("Hello") == (shown["a"]["name"] == "alpha-model")  # the reveal names the answers
    assert shown["a"]["fingerprint"] in ("a" * 64, "b" * 64) and shown["a"]["verified"] is True
    board = b.client.get("/api/leaderboard").json()
    assert board["battles"] == 1 and board["rows"][0]["name"] == shown["a"]["name"]
    assert {s["name"]: s["chance_in_battle"] for s in board["sampling"]} == {"alpha-model": 1.0, "beta-model": 1.0}
    png = b.client.get("/api/leaderboard.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    log = [json.loads(line) for line in b.client.get("/api/battles.jsonl").text.splitlines()]
    assert log[0]["winner"] == "model_a" and log[0]["model_a"] == shown["a"]["name"]
    assert log[0]["judge"] != "127.0.0.1" and len(log[0]["judge"]) == 32  # a salted hash, not the address
    assert log[0]["sampling"] == {"temperature": 0.7, "top_p": 0.9, "max_tokens": 32}


def test_multi_turn_keeps_the_pair(served):
    server, arena = served
    b = Browser(server.url)
    _, token, first = b.battle("one")
    r, _, second = b.battle("two", token=token)
    assert r.status_code == 200 and not any(e["type"] == "battle" for e in second)
    texts = {s: "".join(e["text"] for e in second if e["type"] == "delta" and e["side"] == s) for s in "ab"}
    assert all(t.endswith("(turn 2)") for t in texts.values())
    assert b.post("/api/vote", {"token": token, "winner": "tie"}).status_code == 200
    log = [json.loads(x) for x in b.client.get("/api/battles.jsonl").text.splitlines()]
    assert log[0]["turn"] == 2 and [m["role"] for m in log[0]["conversation_a"]] == ["user", "assistant"] * 2
    again = b.battle("three", token=token)[0]
    assert again.status_code == 409 and "over" in again.json()["error"]


def test_replayed_and_forged_votes_are_refused(served):
    server, arena = served
    b = Browser(server.url)
    _, token, _ = b.battle()
    assert b.post("/api/vote", {"token": token, "winner": "b"}).status_code == 200
    replay = b.post("/api/vote", {"token": token, "winner": "a"})
    assert replay.status_code == 409 and "already" in replay.json()["error"]
    uid = token.split(".")[0]
    for forged in [uid + ".AAAA", "0" * 32 + "." + token.split(".")[1], "nonsense", ""]:
        r = b.post("/api/vote", {"token": forged, "winner": "a"})
        assert r.status_code == 403 and "not issued by this arena" in r.json()["error"]
    _, other_token, _ = b.battle()
    thief = Browser(server.url)  # another session holding a copied token
    stolen = thief.post("/api/vote", {"token": other_token, "winner": "a"})
    assert stolen.status_code == 403 and "not issued by this arena" in stolen.json()["error"]
    assert arena.store.count_votes() == 1
    assert [rec["winner"] for rec in arena.store.records()] == ["model_b"]


def test_csrf_token_is_required(served):
    server, _ = served
    b = Browser(server.url)
    r = b.post("/api/battle", {"prompt": "hi"}, csrf=False)
    assert r.status_code == 403 and "CSRF" in r.json()["error"]
    stranger = httpx.post(server.url + "/api/battle", json={"prompt": "hi"}, headers={"X-CSRF-Token": b.csrf})
    assert stranger.status_code == 403  # the token belongs to another session's cookie


def test_over_limit_clients_and_long_prompts_are_refused(tmp_path):
    arena, config = make_arena(tmp_path)
    config.battles_per_minute, config.max_prompt_chars = 3, 50
    with ServerThread(create_arena_app(arena, config)) as server:
        b = Browser(server.url)
        long = b.post("/api/battle", {"prompt": "x" * 51})
        assert long.status_code == 413 and "at most 50" in long.json()["error"]
        statuses = [b.battle()[0].status_code for _ in range(2)]
        assert statuses == [200, 200]  # the refused long prompt counted too
        limited = b.battle()[0]
        assert limited.status_code == 429 and "at most 3 a minute" in limited.json()["error"]


def test_blocked_clients_are_refused(tmp_path):
    arena, config = make_arena(tmp_path, blocked=["127.0.0.1"])
    with ServerThread(create_arena_app(arena, config)) as server:
        r = Browser(server.url).post("/api/battle", {"prompt": "hi"})
        assert r.status_code == 403 and "blocked" in r.json()["error"]
    arena, config = make_arena(tmp_path / "2")  # blocked at run time by the admin
    with ServerThread(create_arena_app(arena, config)) as server:
        b = Browser(server.url)
        assert b.battle()[0].status_code == 200
        assert httpx.post(server.url + "/api/admin/block", json={"client": "127.0.0.1"},
                          headers={"Authorization": "Bearer adm1n"}).status_code == 200
        assert b.battle()[0].status_code == 403


def test_admin_key_manages_contestants_and_new_weights_are_a_variant(served):
    server, arena = served
    b = Browser(server.url)
    add = {"name": "alpha-model", "model": "c"}
    assert httpx.post(server.url + "/api/admin/contestants", json=add).status_code == 401
    assert httpx.post(server.url + "/api/admin/contestants", json=add,
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = httpx.post(server.url + "/api/admin/contestants", json=add, headers={"Authorization": "Bearer adm1n"})
    assert r.status_code == 200 and r.json()["fingerprint"] == "c" * 64
    seen = set()
    for _ in range(12):
        _, token, _ = b.battle()
        shown = b.post("/api/vote", {"token": token, "winner": "a"}).json()
        seen |= {(shown[s]["name"], shown[s]["fingerprint"]) for s in "ab"}
    board = b.client.get("/api/leaderboard").json()
    variants = {r["key"] for r in board["rows"] if r["name"] == "alpha-model"}
    assert variants == {f"alpha-model@{fp[:12]}" for name, fp in seen if name == "alpha-model"}
    assert ("alpha-model", "c" * 64) in seen and "alpha-model" in board["variant_warnings"]
    old = next(c["id"] for c in arena.store.contestants() if c["fingerprint"] == "a" * 64)
    assert httpx.post(f"{server.url}/api/admin/contestants/{old}/retire").status_code == 401
    assert httpx.post(f"{server.url}/api/admin/contestants/{old}/retire",
                      headers={"Authorization": "Bearer adm1n"}).status_code == 200
    for _ in range(4):  # the retired variant is no longer drawn
        _, token, _ = b.battle()
        shown = b.post("/api/vote", {"token": token, "winner": "b"}).json()
        assert "a" * 64 not in (shown["a"]["fingerprint"], shown["b"]["fingerprint"])
    board = b.client.get("/api/leaderboard").json()
    retired = [r for r in board["rows"] if r["fingerprint"] == "a" * 64]
    assert len(retired) == 1 and retired[0]["retired"] and retired[0]["battles"] > 0  # still on the board
    record = b.client.get("/api/contestants").json()["contestants"]
    assert any(c["fingerprint"] == "a" * 64 and c["retired_at"] for c in record)


def test_no_route_removes_anything(served):
    server, _ = served
    app = server.app
    methods = {m for route in app.routes for m in getattr(route, "methods", ())}
    assert methods <= {"GET", "HEAD", "POST"}
    assert not [r.path for r in app.routes if re.search(r"delete|remove|purge|drop", r.path)]


def test_32_concurrent_voters_over_http_lose_no_vote(served):
    server, arena = served
    voters = [Browser(server.url) for _ in range(32)]
    tokens = [v.battle(f"prompt {i}")[1] for i, v in enumerate(voters)]
    barrier = threading.Barrier(32)
    statuses = [None] * 32

    def vote(i):
        barrier.wait()
        statuses[i] = voters[i].post("/api/vote", {"token": tokens[i], "winner": "ab"[i % 2]}).status_code

    threads = [threading.Thread(target=vote, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 32
    assert arena.store.count_votes() == 32
    assert len({r["judge"] for r in arena.store.records()}) == 1  # one address: one salted hash


def test_a_restart_without_a_variant_marks_it_retired(tmp_path):
    arena, _ = make_arena(tmp_path)
    arena.enter(Scripted("gamma-model", "c" * 64, ["x"]))
    arena.store.import_records([{"model_a": "old", "model_b": "older", "winner": "tie"}])
    restarted, _ = make_arena(tmp_path)  # the same database, gamma no longer configured
    assert restarted.retire_absent() == ["gamma-model@" + "c" * 12]
    states = {c["name"]: c["retired_at"] is not None for c in restarted.store.contestants()}
    assert states == {"alpha-model": False, "beta-model": False, "gamma-model": True, "old": False, "older": False}


# -- issue 23: failures stay anonymous, battles survive, malformed input gets a 4xx --------------------------

def events_of(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: ")]


def failing_endpoint() -> FastAPI:
    """An OpenAI-compatible server whose every answer is an HTTP 500 that names its model."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "hidden-model-7b", "object": "model", "owned_by": "acme"}]}

    @app.post("/v1/chat/completions")
    async def chat():
        return JSONResponse({"error": "hidden-model-7b is overloaded on gpu-node-3"}, status_code=500)

    return app


def test_a_failed_endpoint_is_not_named_before_the_vote(tmp_path):
    with ServerThread(failing_endpoint()) as failing:
        arena, config = make_arena(tmp_path)
        alpha = next(cid for cid, c in arena.playing.items() if c.name == "alpha-model")
        arena.retire(next(cid for cid, c in arena.playing.items() if c.name == "beta-model"))
        arena.enter(EndpointContestant("secret-endpoint", failing.url + "/v1", "hidden-model-7b"))
        with ServerThread(create_arena_app(arena, config)) as server:
            b = Browser(server.url)
            r, token, events = b.battle()
            assert r.status_code == 200 and events[-1] == {"type": "end"}
            for secret in ("secret-endpoint", "hidden-model-7b", "gpu-node-3", failing.url, "alpha-model", "HTTP"):
                assert secret not in r.text
            failed = [e for e in events if e["type"] == "done" and "error" in e]
            assert len(failed) == 1
            side = failed[0]["side"]
            assert failed[0]["error"] == f"model {side.upper()} failed to answer"
            vote = b.post("/api/vote", {"token": token, "winner": "a" if side == "b" else "b"})
            assert vote.status_code == 200 and vote.json()[side]["name"] == "secret-endpoint"
            record = arena.store.records()[0]
            assert record[f"conversation_{side}"][-1] == {"role": "assistant", "content": "", "failed": True}
            other = "b" if side == "a" else "a"
            assert "failed" not in record[f"conversation_{other}"][-1]
            assert arena.store.battle(token.split(".")[0])[f"contestant_{other}"] == alpha


def test_a_full_context_is_not_named_before_the_vote(tmp_path, smollm2):
    from herd.arena.contestants import LocalContestant

    arena, config = make_arena(tmp_path, max_prompt_chars=4000)
    arena.retire(next(cid for cid, c in arena.playing.items() if c.name == "beta-model"))
    arena.enter(LocalContestant("tiny-context-model", smollm2, source="smollm2", context=16))
    with ServerThread(create_arena_app(arena, config)) as server:
        b = Browser(server.url)
        r, token, events = b.battle("Tell me everything about the rivers of Europe, one by one, " * 4)
        assert "tiny-context-model" not in r.text and "alpha-model" not in r.text
        failed = [e for e in events if e["type"] == "done" and "error" in e]
        assert len(failed) == 1 and failed[0]["error"] == (
            f"model {failed[0]['side'].upper()} failed to answer: the conversation is longer than its context "
            "allows; start a new battle")
        assert b.post("/api/vote", {"token": token, "winner": "tie"}).status_code == 200
    arena.close()


class Endless(Scripted):
    """Answers one word every 20 ms until it is stopped."""

    async def stream(self, messages, sampling, max_tokens, answer):
        while True:
            answer.text += "word "
            answer.tokens += 1
            yield "word "
            await asyncio.sleep(0.02)


def test_a_closed_tab_leaves_a_saved_votable_battle(tmp_path):
    arena, config = make_arena(tmp_path)
    arena.retire(next(cid for cid, c in arena.playing.items() if c.name == "beta-model"))
    arena.enter(Endless("endless-model", "e" * 64, []))
    with ServerThread(create_arena_app(arena, config)) as server:
        b = Browser(server.url)
        with b.client.stream("POST", "/api/battle", json={"prompt": "Go on"},
                             headers={"X-CSRF-Token": b.csrf}) as r:
            seen = []
            for line in r.iter_lines():  # leave after the first words of the endless side
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if sum(e.get("text") == "word " for e in seen) >= 3:
                        break
        token = next(e["token"] for e in seen if e["type"] == "battle")
        uid = token.split(".")[0]
        deadline = time.monotonic() + 30
        while not arena.store.battle(uid)["answered"]:
            assert time.monotonic() < deadline, "the battle was never saved after the client left"
            time.sleep(0.05)
        vote = b.post("/api/vote", {"token": token, "winner": "a"})
        assert vote.status_code == 200
        side = "a" if vote.json()["a"]["name"] == "endless-model" else "b"
        record = arena.store.records()[0]
        cut = record[f"conversation_{side}"][-1]
        assert cut["cut"] is True and cut["content"].startswith("word word word ")
        assert "cut" not in record[f"conversation_{'b' if side == 'a' else 'a'}"][-1]
        assert not arena._turns  # nothing left running


def test_lone_surrogates_neither_kill_the_stream_nor_get_stored(tmp_path):
    arena, config = make_arena(tmp_path)
    arena.enter(Scripted("odd-model", "c" * 64, ["bad \ud800 text"]))
    for cid, c in list(arena.playing.items()):
        if c.name != "odd-model" and c.name != "alpha-model":
            arena.retire(cid)
    with ServerThread(create_arena_app(arena, config)) as server:
        b = Browser(server.url)
        raw = b.client.post("/api/battle", content=b'{"prompt": "hi \\ud800 there"}',
                            headers={"X-CSRF-Token": b.csrf, "Content-Type": "application/json"})
        assert raw.status_code == 400 and "`prompt` holds a lone surrogate" in raw.json()["error"]
        r, token, events = b.battle()  # a contestant that answers with a lone surrogate
        assert events[-1] == {"type": "end"}
        assert b.post("/api/vote", {"token": token, "winner": "a"}).status_code == 200
        texts = [m["content"] for r in arena.store.records() for m in r["conversation_a"] + r["conversation_b"]]
        assert "bad ? text (turn 1)" in texts
        assert b.client.get("/api/battles.jsonl").status_code == 200


def test_an_oversized_body_is_refused_before_it_is_read(tmp_path):
    arena, config = make_arena(tmp_path)
    app = create_arena_app(arena, config)
    with ServerThread(app) as server:
        b = Browser(server.url)
        session = b.client.cookies["arena_session"]
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"POST /api/battle HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 300000000\r\nX-CSRF-Token: " + b.csrf.encode() +
                      b"\r\nCookie: arena_session=" + session.encode() + b"\r\n\r\n{\"prompt\": \"")
            reply = s.recv(65536)  # a server that reads the body first never answers: the timeout fails it
        assert reply.startswith(b"HTTP/1.1 413") and b"limit of" in reply

    pulled = 0

    async def body():  # 64 MiB offered in 1 MiB chunks, no Content-Length
        nonlocal pulled
        yield b'{"prompt": "'
        for _ in range(64):
            pulled += 1
            yield b"x" * 2**20

    async def post():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://arena") as client:
            client.cookies.set("arena_session", session)
            return await client.post("/api/battle", content=body(), headers={"X-CSRF-Token": b.csrf})

    r = asyncio.run(post())
    assert r.status_code == 413 and pulled <= 1


def test_malformed_requests_get_a_4xx_and_the_arena_keeps_working(served):
    server, arena = served
    b = Browser(server.url)
    _, token, _ = b.battle()
    headers = {"X-CSRF-Token": b.csrf, "Content-Type": "application/json"}
    admin = {"Authorization": "Bearer adm1n", "Content-Type": "application/json"}
    for winner in (["a"], {"a": 1}, 1, None, "A"):
        r = b.post("/api/vote", {"token": token, "winner": winner})
        assert r.status_code == 400 and "winner must be one of" in r.json()["error"]
    deep = b"[" * 100_000 + b"]" * 100_000
    assert b.client.post("/api/battle", content=deep, headers=headers).status_code == 413  # past the limit
    deep = b'{"prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    r = b.client.post("/api/battle", content=deep, headers=headers)
    assert r.status_code == 400 and "nested deeper than" in r.json()["error"]
    r = httpx.post(f"{server.url}/api/admin/contestants/{2**70}/retire", headers=admin)
    assert r.status_code == 404 and "no active contestant" in r.json()["error"]
    for weight in (b"NaN", b"Infinity", b"-Infinity", b"1e400", str(2**70).encode(), b"0", b"-1", b'"2"', b"true"):
        r = httpx.post(server.url + "/api/admin/contestants", headers=admin,
                       content=b'{"name": "gamma-model", "model": "g", "weight": ' + weight + b"}")
        assert r.status_code == 400 and re.search(r"weight|NaN|Infinity", r.json()["error"]), (weight, r.text)
    assert {c.name for c in arena.playing.values()} == {"alpha-model", "beta-model"}
    with pytest.raises(HerdError, match="weight"):
        arena.enter(Scripted("nan-model", "n" * 64, ["x"], weight=float("nan")))
    assert b.post("/api/vote", {"token": token, "winner": "b"}).status_code == 200  # everything still works
    _, token, events = b.battle()
    assert events[-1] == {"type": "end"}
    assert b.client.get("/api/leaderboard").status_code == 200
    assert b.client.get("/api/leaderboard.png").status_code == 200


def test_a_name_with_dollar_signs_draws_in_the_plot(tmp_path):
    arena, config = make_arena(tmp_path)
    for cid in list(arena.playing):
        arena.retire(cid)
    arena.enter(Scripted("$\\undefinedcmd$", "d" * 64, ["math"]))  # matplotlib: "Unknown symbol"
    arena.enter(Scripted("$x^$ and $", "f" * 64, ["more"]))  # and a superscript with nothing to raise
    with ServerThread(create_arena_app(arena, config)) as server:
        b = Browser(server.url)
        _, token, _ = b.battle()
        assert b.post("/api/vote", {"token": token, "winner": "a"}).status_code == 200
        names = {r["name"] for r in b.client.get("/api/leaderboard").json()["rows"]}
        assert names == {"$\\undefinedcmd$", "$x^$ and $"}
        png = b.client.get("/api/leaderboard.png")
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
