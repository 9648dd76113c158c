"""A seeded fuzz of the arena's HTTP surface: a few hundred malformed requests (wrong types, deep JSON, huge
ids and numbers, NaN and Infinity, lone surrogates, bytes that are not UTF-8, truncated and oversized
bodies, odd headers and query strings) against a real loopback server. Each must get a 4xx, never a 500
or a hang (every request has a deadline), and afterwards the arena must still battle, take a vote and
draw its leaderboard.
"""

from __future__ import annotations

import json
import random

import httpx

from herd.arena.web import create_arena_app
from tests.fixtures.serving import ServerThread
from tests.test_arena_web import Browser, make_arena

SEED, CASES = 23, 320


def deep_array(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def deep_object(depth: int) -> bytes:
    return b'{"a": ' * depth + b"1" + b"}" * depth


def text(s: str) -> bytes:
    return json.dumps(s).encode()


NOT_JSON_NUMBERS = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"9" * 5000]
HUGE = [str(2**70).encode(), str(-(2**64)).encode(), b"1" + b"0" * 40]
DEEP = [deep_array(40), deep_object(40), deep_array(2000), deep_object(3000), deep_array(20_000)]
SURROGATES = [b'"\\ud800"', b'"x \\udfff y"', b'"\\udc00\\ud800"', b'"ok \\ud83d"']
WRONG_TYPES = [b"true", b"false", b"null", b"[]", b"{}", b"0", b"-1", b"1.5", b'[1, "a"]', b'{"prompt": "x"}']
EMPTY_TEXT = [b'""', b'"   "', b'"\\n\\t"']

BAD_PROMPTS = NOT_JSON_NUMBERS + HUGE + DEEP + SURROGATES + WRONG_TYPES + EMPTY_TEXT + [text("x" * 4001)]
BAD_NAMES = NOT_JSON_NUMBERS + HUGE + DEEP + SURROGATES + WRONG_TYPES + EMPTY_TEXT + [text("n" * 201)]
BAD_WEIGHTS = NOT_JSON_NUMBERS + HUGE + DEEP + SURROGATES + [b"0", b"-1", b"-0.0", b"true", b"false", b"null",
                                                           b'"1"', b"[]", b"{}", b"1e7", b"1000001"]
BAD_WINNERS = NOT_JSON_NUMBERS + HUGE + DEEP + SURROGATES + WRONG_TYPES + [
    text(w) for w in ("A", "model_a", "", "tie ", "Both", "a\u0000", "ÿ")]
BAD_TOKENS = NOT_JSON_NUMBERS + HUGE + DEEP + SURROGATES + WRONG_TYPES + [
    text(t) for t in ("", ".", "x.y", "é.é", "\u00ff" * 10, "a" * 5000, "0" * 32 + ".AAAA", "\u2603.\u2603")]
BAD_CIDS = [str(2**70), "-1", "1e3", "abc", "\u0663", "99999999999", "4294967296", "2147483648", "%00", "a" * 300,
            "1.0", "+1", " 1", "0x10", "%ED%A0%80"]
BAD_BOARDS = ["humans", "", "HUMAN", "judge ", "%ED%A0%80", "%FF", "x" * 3000, "human%00", "\u2603"]
GARBAGE = [b"", b"{", b"}", b'{"prompt": ', b"\xff\xfe", b"\xef\xbb\xbf{}", b"[]", b'"just text"', b"12",
           b"null", b'{"prompt": "hi" "x"}', b"{'prompt': 'hi'}", b'{"prompt": "\xc3\x28"}', b"\x00" * 10]


def obj(rng: random.Random, fields: dict[str, bytes]) -> bytes:
    """A JSON object written by hand (the values are raw JSON, valid or not), keys shuffled, sometimes with
    extra keys."""
    items = list(fields.items())
    if rng.random() < 0.3:
        items.append((rng.choice(["extra", "prompt2", "__proto__", "winner"]), rng.choice(WRONG_TYPES + HUGE)))
    rng.shuffle(items)
    return b"{" + b", ".join(json.dumps(k).encode() + b": " + v for k, v in items) + b"}"


def cases(rng: random.Random, token: str, csrf: str):
    """(method, path, body bytes or None, headers kind, note): every one malformed in some way."""
    valid_prompt = text("What is 2 + 2?")
    for _ in range(CASES):
        kind = rng.randrange(12)
        if kind == 0:
            yield "POST", "/api/battle", obj(rng, {"prompt": rng.choice(BAD_PROMPTS)}), "user", "bad prompt"
        elif kind == 1:
            yield "POST", "/api/battle/turn", obj(rng, {"token": text(token), "prompt": rng.choice(BAD_PROMPTS)}), \
                "user", "bad turn prompt"
        elif kind == 2:
            yield "POST", "/api/battle/turn", obj(rng, {"token": rng.choice(BAD_TOKENS), "prompt": valid_prompt}), \
                "user", "bad turn token"
        elif kind == 3:
            yield "POST", "/api/vote", obj(rng, {"token": text(token), "winner": rng.choice(BAD_WINNERS)}), \
                "user", "bad winner"
        elif kind == 4:
            yield "POST", "/api/vote", obj(rng, {"token": rng.choice(BAD_TOKENS), "winner": text("a")}), \
                "user", "bad vote token"
        elif kind == 5:
            fields = {"name": rng.choice(BAD_NAMES), "model": text("m")}
            if rng.random() < 0.5:
                fields = {"name": text("fuzz-model"), "model": text("m"), "weight": rng.choice(BAD_WEIGHTS)}
            yield "POST", "/api/admin/contestants", obj(rng, fields), "admin", "bad contestant"
        elif kind == 6:
            yield "POST", f"/api/admin/contestants/{rng.choice(BAD_CIDS)}/retire", None, "admin", "bad id"
        elif kind == 7:
            client = rng.choice(NOT_JSON_NUMBERS + HUGE + DEEP + SURROGATES + WRONG_TYPES[:-1] + [b'""'])
            yield "POST", "/api/admin/block", obj(rng, {"client": client}), "admin", "bad client"
        elif kind == 8:
            path = rng.choice(["/api/battle", "/api/battle/turn", "/api/vote", "/api/admin/contestants",
                               "/api/admin/block"])
            body = rng.choice(GARBAGE + DEEP + [deep_array(100_000), b"x" * 70_000])
            yield "POST", path, body, "admin" if "admin" in path else "user", "garbage body"
        elif kind == 9:
            good = obj(rng, {"prompt": valid_prompt})
            cut = rng.randrange(1, len(good))  # a proper prefix of an object is never JSON
            body = good[:cut] if rng.random() < 0.5 else good.replace(b"2 + 2", b"2 \xff 2")
            yield "POST", "/api/battle", body, "user", "truncated or not UTF-8"
        elif kind == 10:
            yield "POST", "/api/battle", obj(rng, {"prompt": valid_prompt}), rng.choice(
                ["no-csrf", "latin1-csrf", "wrong-cookie", "no-cookie"]), "bad headers"
        else:
            path = rng.choice(["/api/leaderboard", "/api/leaderboard.png", "/api/battles.jsonl"])
            yield "GET", f"{path}?board={rng.choice(BAD_BOARDS)}", None, "none", "bad board"


def test_malformed_requests_get_4xx_never_500_or_a_hang(tmp_path):
    arena, config = make_arena(tmp_path)
    with ServerThread(create_arena_app(arena, config)) as server:
        b = Browser(server.url)
        _, token, _ = b.battle()
        session = b.client.cookies["arena_session"]
        statuses = {}
        with httpx.Client(base_url=server.url, timeout=20) as client:  # a hang fails the test at 20 s
            for method, path, body, who, note in cases(random.Random(SEED), token, b.csrf):
                headers = {"Content-Type": "application/json", "Cookie": f"arena_session={session}".encode()}
                if who == "admin":
                    headers["Authorization"] = "Bearer adm1n"
                elif who in ("user", "no-cookie", "wrong-cookie"):
                    headers["X-CSRF-Token"] = b.csrf
                elif who == "latin1-csrf":
                    headers["X-CSRF-Token"] = (b.csrf[:-2] + "\u00e9\u00ff").encode("latin-1")
                if who == "no-cookie":
                    del headers["Cookie"]
                elif who == "wrong-cookie":
                    headers["Cookie"] = "arena_session=\u00e9t\u00e9\u00ff".encode("latin-1")
                r = client.request(method, path, content=body, headers=headers)
                assert 400 <= r.status_code < 500, (note, path, body[:200] if body else None, r.status_code, r.text)
                assert "error" in r.json(), (note, path)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert set(statuses) >= {400, 403, 404, 413}  # the cases reached every kind of refusal

        # the arena still works: a battle, its vote, the boards, the plot and the record
        assert b.post("/api/vote", {"token": token, "winner": "a"}).status_code == 200
        _, token, events = b.battle()
        assert events[-1] == {"type": "end"}
        assert b.post("/api/vote", {"token": token, "winner": "tie"}).status_code == 200
        for path in ("/api/leaderboard", "/api/leaderboard?board=judge", "/api/leaderboard.png", "/api/contestants",
                     "/api/battles.jsonl"):
            assert b.client.get(path).status_code == 200, path
        assert arena.store.count_votes() == 2
        assert {c.name for c in arena.playing.values()} == {"alpha-model", "beta-model"}
