"""Endpoint contestants, the judge and the `herd arena` command line.

Endpoints: a real herd server (its /v1/models card carries herd's fingerprint: recorded, as the endpoint's
claim), a foreign OpenAI-compatible server (no fingerprint: "weights unverified") and a forger whose card
claims to be herd with any fingerprint: no endpoint is ever verified, only weights herd loaded itself.
The judge runs through the command line against a foreign judge that always prefers the first answer:
asked in both orders, it must leave the two contestants level. `herd arena rate --json` must print the
numbers of herd.arena.board (which tests/test_arena_rating.py holds to fschat).
"""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from herd.arena.contestants import Answer, EndpointContestant
from herd.cli import main as herd_main
from tests.fixtures.serving import ServerThread


FORGED = "0123456789abcdef" * 4  # a fingerprint the forger claims: any 64 hex digits


def foreign_server() -> FastAPI:
    """An OpenAI-compatible server that is not herd: fixed replies; the judge model always says [[A]]."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "someone"}
                                           for m in ("judge", "left", "right")]
                + [{"id": "forger", "object": "model", "owned_by": "herd", "fingerprint": FORGED}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        text = "Both are fine, but the first is better. [[A]]" if body["model"] == "judge" else \
            f"# {body['model']} answers\n- **yes**"

        async def events():
            for piece in text.split(" "):
                yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": piece + " "}}]}) + "\n\n"
            yield "data: " + json.dumps({"choices": [], "usage": {"completion_tokens": len(text.split())}}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def foreign():
    with ServerThread(foreign_server()) as server:
        yield server


def collect(contestant, messages, **sampling):
    answer = Answer()

    async def run():
        async for _ in contestant.stream(messages, sampling, 8, answer):
            pass

    asyncio.run(run())
    return answer


def test_a_herd_servers_fingerprint_is_recorded_as_its_claim(smollm2):
    from herd.server import create_app

    with ServerThread(create_app(smollm2, max_batch=2, context=256, model_id="smollm2")) as server:
        served = EndpointContestant("served", server.url + "/v1", "smollm2")
        assert served.fingerprint == smollm2.fingerprint and served.fingerprint_claimed
        assert served.verified is False  # the card is the endpoint's word; herd never saw those weights
        messages = [{"role": "user", "content": "Name a colour."}]
        answer = collect(served, messages, temperature=0.0)
        assert answer.error is None
        assert answer.text == smollm2.chat(messages, max_tokens=8, temperature=0).text
        assert answer.tokens == 8
        wrong = EndpointContestant("other", server.url + "/v1", "not-this-model")
        assert not wrong.verified and wrong.fingerprint.startswith("unverified:") and not wrong.fingerprint_claimed


def test_no_endpoint_is_verified_only_weights_herd_loaded(foreign, smollm2, tmp_path):
    """The checker both ways: a forged herd card is stored and shown as a claim, never as verified; a local
    contestant, whose weights herd loaded and hashed, is verified."""
    from herd.arena.contestants import LocalContestant
    from herd.arena.service import Arena
    from herd.arena.store import Store

    forger = EndpointContestant("forger", foreign.url + "/v1", "forger")
    assert forger.fingerprint == FORGED and forger.fingerprint_claimed and forger.verified is False
    arena = Arena(Store(f"sqlite:///{tmp_path / 'a.db'}"), sampling={}, max_tokens=4)
    arena.enter(forger)
    arena.enter(LocalContestant("local", smollm2, source="smollm2", context=64))
    arena.enter(EndpointContestant("left", foreign.url + "/v1", "left"))
    stored = {c["name"]: c["verified"] for c in arena.store.contestants()}
    assert stored == {"forger": False, "local": True, "left": False}
    shown = {s["name"]: s["verification"] for s in arena.sampling_table()}
    assert shown["forger"].startswith("claimed by the endpoint, not verified")
    assert shown["local"].startswith("verified: herd loaded these weights")
    assert shown["left"].startswith("not verified: the endpoint reports no fingerprint")
    uid = arena.start("c", pair=tuple(cid for cid, c in arena.playing.items() if c.name in ("forger", "local")))
    arena.store.save_answers(uid, [], [], 0, 0)
    revealed = {c["name"]: (c["verified"], c["verification"]) for c in arena.reveal(uid).values()}
    assert revealed["forger"][0] is False and "claimed by the endpoint" in revealed["forger"][1]
    assert revealed["local"][0] is True
    arena.close()


def test_a_foreign_endpoint_is_weights_unverified(foreign):
    c = EndpointContestant("left", foreign.url + "/v1", "left")
    assert not c.verified and c.fingerprint.startswith("unverified:")
    assert EndpointContestant("left", foreign.url + "/v1", "left").fingerprint == c.fingerprint
    assert EndpointContestant("right", foreign.url + "/v1", "right").fingerprint != c.fingerprint
    answer = collect(c, [{"role": "user", "content": "hi"}])
    assert answer.text.strip() == "# left answers\n- **yes**" and answer.tokens == 5


def test_judge_in_both_orders_cancels_position_bias(foreign, tmp_path, capsys):
    config = tmp_path / "arena.toml"
    config.write_text(f'''
[arena]
db = "arena.db"
bootstrap_rounds = 20

[[contestant]]
name = "left"
url = "{foreign.url}/v1"
model = "left"

[[contestant]]
name = "right"
url = "{foreign.url}/v1"
model = "right"
weight = 3
''')
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2 + 2?\nName a river.\n")
    assert herd_main(["arena", "judge", "--config", str(config), "--judge", "judge", "--judge-url",
                      foreign.url + "/v1", "--prompts", str(prompts)]) == 0
    assert "4 judged battles" in capsys.readouterr().err
    out = tmp_path / "judged.jsonl"
    assert herd_main(["arena", "export", "--config", str(config), "--board", "judge", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4 and {r["board"] for r in records} == {"judge"}
    assert all(r["winner"] == "model_a" for r in records)  # the judge always picked the first position
    assert sorted((r["model_a"], r["model_b"]) for r in records) == [("left", "right")] * 2 + [("right", "left")] * 2
    assert all(r["judge"].startswith("judge:judge@") and r["verified_a"] is False for r in records)
    capsys.readouterr()
    assert herd_main(["arena", "rate", str(out), "--board", "judge", "--json", "--rounds", "20"]) == 0
    board = json.loads(capsys.readouterr().out)
    ratings = {r["key"]: r["rating"] for r in board["rows"]}
    assert ratings["left"] == pytest.approx(ratings["right"], abs=1e-6)  # level: the bias cancelled
    human = tmp_path / "human.jsonl"
    herd_main(["arena", "export", "--config", str(config), "--board", "human", "--out", str(human)])
    assert human.read_text() == ""  # the judge's battles stay off the human board


def test_rate_prints_the_board_the_page_shows(tmp_path, capsys):
    from herd.arena.battlelog import read_battles
    from herd.arena.board import Options, leaderboard
    from tests.test_arena_rating import random_battles

    path = tmp_path / "battles.jsonl"
    with path.open("w") as f:
        for b in random_battles(9, n=150):
            conv = lambda side: [{"role": "user", "content": "q"},  # noqa: E731
                                 {"role": "assistant", "content": "**x** " * b[f"bold_count_{side}"]
                                  + "w " * (b[f"sum_assistant_tokens_{side}"] // 10)}]
            f.write(json.dumps({"model_a": b["model_a"], "model_b": b["model_b"], "winner": b["winner"],
                                "tstamp": b["tstamp"], "conversation_a": conv("a"), "conversation_b": conv("b"),
                                "anony": True}) + "\n")
    assert herd_main(["arena", "rate", str(path), "--style-control", "--anchor", "llama-13b=800", "--json",
                      "--rounds", "30", "--seed", "4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = leaderboard(read_battles(path), Options(rounds=30, seed=4, anchor=("llama-13b", 800.0)))
    assert printed == json.loads(json.dumps(expected))
    assert {r["key"]: r["rating"] for r in printed["rows"]}["llama-13b"] == 800.0
    assert "style_control" in printed and printed["style_control"]["coefficients"]["bold_count"] != 0
    assert herd_main(["arena", "rate", str(path), "--rounds", "10"]) == 0
    text = capsys.readouterr().out
    assert "Bradley-Terry ratings, 150 battles" in text and "style controlled" not in text


def test_rate_names_the_bad_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"model_a": "x", "model_b": "y", "winner": "model_a"}) + "\n"
                    + json.dumps({"model_a": "x", "model_b": "y", "winner": "left"}) + "\n")
    assert herd_main(["arena", "rate", str(path)]) == 2
    assert f"{path}:2: `winner` must be one of" in capsys.readouterr().err


def test_config_errors_name_the_entry(tmp_path):
    from herd.arena.config import load_config
    from herd.errors import ConfigError

    path = tmp_path / "arena.toml"
    path.write_text('[[contestant]]\nname = "x"\nmodel = "m"\nweight = -1\n')
    with pytest.raises(ConfigError, match=r"\[\[contestant\]\] #1 \(x\): `weight` must be a number > 0"):
        load_config(path)
    path.write_text('[arena]\nmax_tokenz = 5\n')
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(path)


def test_serve_from_the_command_line_shows_an_imported_log(foreign, tmp_path, capsys):
    import subprocess
    import sys
    import time

    import httpx

    from tests.fixtures.serving import free_port

    log = tmp_path / "published.jsonl"  # a published log in FastChat's shape: names only, no fingerprints
    log.write_text("".join(json.dumps({"model_a": a, "model_b": b, "winner": w, "tstamp": i, "anony": True}) + "\n"
                           for i, (a, b, w) in enumerate([("vicuna", "alpaca", "model_a"),
                                                          ("alpaca", "vicuna", "tie"),
                                                          ("vicuna", "alpaca", "model_b")])))
    db = tmp_path / "served.db"
    assert herd_main(["arena", "import", str(log), "--db", str(db)]) == 0
    assert "3 battles added" in capsys.readouterr().err
    config = tmp_path / "arena.toml"
    config.write_text("".join(f'[[contestant]]\nname = "{m}"\nurl = "{foreign.url}/v1"\nmodel = "{m}"\n\n'
                              for m in ("left", "right")))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "herd", "arena", "serve", "--config", str(config), "--db", str(db),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(300):  # bounded: 60 s
            try:
                board = httpx.get(f"http://127.0.0.1:{port}/api/leaderboard", timeout=5).json()
                break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.2)
        else:
            raise AssertionError("herd arena serve did not answer")
        assert board["battles"] == 3 and {r["key"] for r in board["rows"]} == {"vicuna", "alpaca"}
        assert {s["name"]: s["verified"] for s in board["sampling"]} == {"left": False, "right": False}
        page = httpx.get(f"http://127.0.0.1:{port}/").text
        assert 'name="csrf"' in page and "left" not in page and "right" not in page
    finally:
        proc.terminate()
        proc.wait(30)


def test_rate_reads_fastchats_json_array(tmp_path, capsys):
    """FastChat publishes clean_battle_*.json as one JSON array; its extra fields are carried along."""
    battles = [{"model_a": "gpt-4", "model_b": "vicuna-13b", "winner": w, "judge": "arena_user_1", "turn": 1,
                "anony": True, "language": "English", "tstamp": 1.0 + i, "question_id": f"q{i}"}
               for i, w in enumerate(["model_a", "model_a", "tie", "model_b", "tie (bothbad)"])]
    path = tmp_path / "clean_battle_20240101.json"
    path.write_text(json.dumps(battles))
    assert herd_main(["arena", "rate", str(path), "--json", "--rounds", "10"]) == 0
    board = json.loads(capsys.readouterr().out)
    assert board["battles"] == 5 and [r["key"] for r in board["rows"]] == ["gpt-4", "vicuna-13b"]
    assert [(r["wins"], r["ties"]) for r in board["rows"]] == [(2, 2), (1, 2)]
