"""The arena's HTTP app with scripted contestants (instant, known answers): the battle flow, anonymity
until the vote, and every refusal the issue lists, on SQLite and on a real PostgreSQL server. Real models
fight in tests/test_arena_browser.py.

Checked from outside: an httpx client over a real loopback server, and the database read back.
"""

from __future__ import annotations

import json
import re
import threading

import httpx
import pytest

from herd.arena.config import ArenaConfig
from herd.arena.contestants import Contestant
from herd.arena.service import Arena
from herd.arena.store import Store
from herd.arena.web import create_arena_app
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
