"""The arena's record on SQLite and on a real PostgreSQL server started for the module.

Checked against the databases themselves (SQL run on them directly) and against the battle log the
record exports, rated by herd.arena.rating (whose own reference is fschat, tests/test_arena_rating.py).
"""

from __future__ import annotations

import json
import threading

import pytest
import sqlalchemy as sa

from herd.arena import store as store_module
from herd.arena.battlelog import read_battles
from herd.arena.board import Options, leaderboard
from herd.arena.store import Store
from tests.fixtures import postgres


@pytest.fixture(scope="module")
def pg_server():
    server, why = postgres.start()
    if server is None:
        pytest.skip(why)
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'arena.db'}"
    server = request.getfixturevalue("pg_server")
    engine = sa.create_engine(server.url)
    with engine.begin() as conn:  # a clean schema for each test
        conn.execute(sa.text("DROP SCHEMA public CASCADE"))
        conn.execute(sa.text("CREATE SCHEMA public"))
    engine.dispose()
    return server.url


def answered_battle(store, a, b, prompt="hi", board="human"):
    uid = store.create_battle(board, a, b, {"temperature": 0.7, "max_tokens": 16}, client="c0")
    store.save_answers(uid, [{"role": "user", "content": prompt}, {"role": "assistant", "content": "A says **hi**"}],
                       [{"role": "user", "content": prompt}, {"role": "assistant", "content": "B says hi"}], 4, 3)
    return uid


def test_sqlite_runs_in_wal_mode(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'a.db'}")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_migrations_upgrade_an_old_database_and_keep_its_battles(db_url):
    old = Store(db_url, migrate=False)
    assert old.migrate(target=1) == 1
    a = old.add_contestant("x", "f" * 64, "local", True)
    b = old.add_contestant("y", "e" * 64, "local", True)
    old.add_contestant("claims", "d" * 64, "endpoint", True)  # stored as verified before version 3
    old.add_contestant("logged", "c" * 64, "imported", True)
    uid = answered_battle(old, a, b)
    assert old.vote(uid, "model_a", "v")
    with old.engine.connect() as conn:
        assert not sa.inspect(conn).has_table("blocked_clients")
    old.close()
    new = Store(db_url)
    assert new.version() == len(store_module.MIGRATIONS) == 3
    assert [r["winner"] for r in new.records()] == ["model_a"]
    new.block("someone")
    assert new.blocked("someone") and not new.blocked("else")
    # only weights herd loaded itself stay verified: an endpoint's card and a log's word are claims
    assert {c["name"]: c["verified"] for c in new.contestants()} == {"x": True, "y": True, "claims": False,
                                                                     "logged": False}
    assert Store(db_url).version() == 3  # migrating again is a no-op


def test_a_vote_counts_once_and_only_after_the_answers(db_url):
    store = Store(db_url)
    a = store.add_contestant("x", "f" * 64, "local", True)
    b = store.add_contestant("y", "e" * 64, "local", True)
    uid = store.create_battle("human", a, b, {}, "c")
    assert not store.vote(uid, "model_a", "v1")  # answers not in yet
    store.save_answers(uid, [], [], 0, 0)
    assert store.vote(uid, "model_b", "v1")
    assert not store.vote(uid, "model_a", "v2")  # replayed / second vote
    assert not store.start_turn(uid)  # a voted battle is over
    assert [(r["winner"], r["judge"]) for r in store.records()] == [("model_b", "v1")]


def test_new_weights_under_an_existing_name_are_a_second_variant(db_url):
    store = Store(db_url)
    first = store.add_contestant("llama", "1" * 64, "local", True)
    assert store.add_contestant("llama", "1" * 64, "local", True) == first
    second = store.add_contestant("llama", "2" * 64, "local", True)
    other = store.add_contestant("other", "3" * 64, "local", True)
    assert second != first
    for cid, winner in [(first, "model_a"), (second, "model_b"), (second, "model_a")]:
        assert store.vote(answered_battle(store, cid, other), winner, "v")
    board = leaderboard(store.records(), Options(rounds=20))
    keys = {r["key"]: r for r in board["rows"]}
    assert set(keys) == {"llama@" + "1" * 12, "llama@" + "2" * 12, "other"}
    assert keys["llama@" + "1" * 12]["variants_of_name"] == 2
    assert "llama" in board["variant_warnings"] and "2 different sets of weights" in board["variant_warnings"]["llama"]
    assert board["same_weights_warnings"] == {}
    renamed = store.add_contestant("llama-renamed", "1" * 64, "local", True)  # old weights, a new name
    store.vote(answered_battle(store, renamed, other), "model_a", "v")
    warnings = leaderboard(store.records(), Options(rounds=5))["same_weights_warnings"]
    assert list(warnings.values()) == ["llama, llama-renamed are the same weights (fingerprint 1111111111111111)"]


def test_retiring_keeps_every_battle_on_the_board(db_url):
    store = Store(db_url)
    a = store.add_contestant("x", "f" * 64, "local", True)
    b = store.add_contestant("y", "e" * 64, "local", True)
    for winner in ["model_a", "model_b", "tie"]:
        store.vote(answered_battle(store, a, b), winner, "v")
    assert store.retire(a) and not store.retire(a)
    facts = {(c["name"], c["fingerprint"]): {"retired": c["retired_at"] is not None} for c in store.contestants()}
    board = leaderboard(store.records(), Options(rounds=10), contestants=facts)
    assert {r["key"]: (r["battles"], r["retired"]) for r in board["rows"]} == {"x": (3, True), "y": (3, False)}


def test_nothing_in_the_store_deletes():
    public = [n for n in dir(Store) if not n.startswith("_")]
    assert not [n for n in public if any(w in n.lower() for w in ("delete", "remove", "drop", "purge", "clear"))]
    import inspect

    source = inspect.getsource(store_module)
    assert ".delete(" not in source and "DELETE" not in source.upper().replace("DELETES", "")


def test_32_concurrent_voters_lose_no_vote(db_url):
    store = Store(db_url)
    a = store.add_contestant("x", "f" * 64, "local", True)
    b = store.add_contestant("y", "e" * 64, "local", True)
    uids = [answered_battle(store, a, b, prompt=f"p{i}") for i in range(32)]
    barrier = threading.Barrier(32)
    results = [None] * 32

    def voter(i):
        barrier.wait()
        # each voter also tries to steal its neighbour's battle: exactly one vote per battle may win
        results[i] = (store.vote(uids[i], "model_a" if i % 2 else "model_b", f"v{i}"),
                      store.vote(uids[(i + 1) % 32], "tie", f"thief{i}"))

    threads = [threading.Thread(target=voter, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = sum(ok for pair in results for ok in pair)
    assert won == 32
    with store.engine.connect() as conn:  # read the table directly, not through the store
        rows = conn.execute(sa.text("SELECT uid, winner, voter FROM battles")).all()
    assert len(rows) == 32 and all(r.winner is not None for r in rows)
    assert store.count_votes() == 32


def test_export_import_round_trip_rates_the_same(db_url, tmp_path):
    store = Store(db_url)
    ids = [store.add_contestant(n, n * 32, "local", True) for n in ("aa", "bb", "cc")]
    winners = ["model_a", "model_b", "tie", "tie (bothbad)", "model_a", "model_a"]
    for i, w in enumerate(winners):
        store.vote(answered_battle(store, ids[i % 3], ids[(i + 1) % 3]), w, f"v{i}")
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in store.records()))
    records = read_battles(path)
    assert {"model_a", "model_b", "winner", "judge", "conversation_a", "conversation_b", "turn", "anony",
            "language", "tstamp", "conv_metadata", "fingerprint_a", "sampling"} <= set(records[0])
    assert records[0]["conv_metadata"]["bold_count_a"] == {"**": 1, "__": 0}
    other = Store(f"sqlite:///{tmp_path / 'other.db'}")
    assert other.import_records(records) == len(winners)
    assert other.import_records(records) == 0  # the same battles are not added twice
    options = Options(rounds=30, seed=1)

    def rated(rows):
        return [{k: v for k, v in r.items() if k != "verified"} for r in rows]

    imported = leaderboard(other.records(), options)["rows"]
    assert rated(imported) == rated(leaderboard(store.records(), options)["rows"])
    assert not any(r["verified"] for r in imported)  # the log says verified; this arena loaded no weights
