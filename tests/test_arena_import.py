"""`herd arena import` and `herd arena rate` on bad battle logs: each bad line is one error line naming the
file, the line and what is wrong, with a non-zero exit and nothing imported; and a log without
`question_id` imported twice adds its battles once (two identical lines are still two battles).

Checked through the command line as a user runs it, the database read back with SQL.
"""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from herd.cli import main as herd_main

GOOD = json.dumps({"model_a": "vicuna", "model_b": "alpaca", "winner": "model_a", "tstamp": 1.0})


def record(**fields) -> str:
    return json.dumps({"model_a": "vicuna", "model_b": "alpaca", "winner": "tie", **fields})


def deep(depth: int) -> str:
    return '{"model_a": "x", "model_b": "y", "winner": "tie", "sampling": ' + '{"a": ' * depth + "1" + \
        "}" * depth + "}"


BAD_LINES = [
    (record(tstamp="yesterday"), "`tstamp` must be a time in seconds"),
    (record(tstamp=None).replace("null", "NaN"), "NaN is not a number"),
    (record(tstamp=0).replace(": 0", ": 1e400"), "`tstamp` is inf, not a finite number"),
    (record(tstamp=0).replace(": 0", ": " + "9" * 400), "`tstamp` must be a time in seconds"),
    (record(tstamp_start=[1]), "`tstamp_start` must be a time"),
    (record(winner=["model_a"]), "`winner` must be one of"),
    (record(winner={"model_a": 1}), "`winner` must be one of"),
    (record(model_a=5), "`model_a` must be a contestant's name"),
    (record(model_b="x" * 201), "`model_b` must be a contestant's name"),
    (record(conversation_a="hello"), "`conversation_a` must be a list of {role, content} messages"),
    (record(conversation_b=[{"role": 1, "content": "x"}]), "`conversation_b` must be a list"),
    (record(conv_metadata={"sum_assistant_a_tokens": "many"}), "`conv_metadata.sum_assistant_a_tokens` must be"),
    (record(conv_metadata={"sum_assistant_a_tokens": 3, "sum_assistant_b_tokens": 2**70}),
     "`conv_metadata.sum_assistant_b_tokens` must be"),
    (record(question_id={"id": 1}), "`question_id` must be a string or integer"),
    (record(question_id="q" * 65), "`question_id` must be a string or integer"),
    (record(judge=7), "`judge` must be a string"),
    (record(verified_a="yes"), "`verified_a` must be true or false"),
    (record(sampling=[0.7]), "`sampling` must be an object"),
    (record(board="both"), "`board` must be human or judge"),
    (record(fingerprint_a=12), "`fingerprint_a` must be a string"),
    (deep(100_000), "nested deeper than"),
    (deep(40), "nested deeper than 32 levels"),
    (record(conversation_a=[{"role": "user", "content": "x"}]).replace('"x"', '"\\ud800"'),
     "`conversation_a`[0].content holds a lone surrogate"),
    ("[1, 2]", "expected a JSON object (one battle), got list"),
    ('{"model_a": "x",', "not valid JSON"),
]


@pytest.mark.parametrize("line,message", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_a_bad_line_is_one_error_naming_it(tmp_path, capsys, line, message):
    log = tmp_path / "battles.jsonl"
    log.write_text(GOOD + "\n" + line + "\n")
    db = tmp_path / "arena.db"
    for command in (["arena", "import", str(log), "--db", str(db)], ["arena", "rate", str(log)]):
        assert herd_main(command) == 2, command
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"herd arena: {log}:2: ") and message in err, err
    with sa.create_engine(f"sqlite:///{db}").connect() as conn:  # nothing was imported
        assert conn.execute(sa.text("SELECT count(*) FROM battles")).scalar() == 0


def test_a_log_that_is_not_utf8_names_its_line(tmp_path, capsys):
    log = tmp_path / "battles.jsonl"
    log.write_bytes(GOOD.encode() + b"\n" + record(judge="x").encode().replace(b'"x"', b'"\xff"') + b"\n")
    assert herd_main(["arena", "import", str(log), "--db", str(tmp_path / "a.db")]) == 2
    err = capsys.readouterr().err
    assert err == f"herd arena: {log}:2: not UTF-8 (byte 0xff)\n"


def test_a_json_array_log_names_the_bad_item(tmp_path, capsys):
    log = tmp_path / "clean_battle.json"
    log.write_text(json.dumps([json.loads(GOOD), {"model_a": "x", "model_b": "y", "winner": "tie", "tstamp": "x"}]))
    assert herd_main(["arena", "rate", str(log)]) == 2
    assert capsys.readouterr().err == f"herd arena: {log}: item 2: `tstamp` must be a time in seconds (a finite " \
                                      "number), got 'x'\n"
    log.write_text("[" * 100_000 + "]" * 100_000)
    assert herd_main(["arena", "rate", str(log)]) == 2
    assert "nested deeper than" in capsys.readouterr().err


def test_a_log_without_question_ids_imported_twice_adds_its_battles_once(tmp_path, capsys):
    log = tmp_path / "published.jsonl"
    lines = [GOOD, record(tstamp=2.0), record(tstamp=2.0), record(winner="model_b")]  # lines 2 and 3 are equal
    log.write_text("\n".join(lines) + "\n")
    db = tmp_path / "arena.db"
    assert herd_main(["arena", "import", str(log), "--db", str(db)]) == 0
    assert "4 battles added" in capsys.readouterr().err
    assert herd_main(["arena", "import", str(log), "--db", str(db)]) == 0
    assert "0 battles added" in capsys.readouterr().err
    log.write_text("\n".join(lines + [record(tstamp=2.0)]) + "\n")  # the log grew by a third equal line
    assert herd_main(["arena", "import", str(log), "--db", str(db)]) == 0
    assert "1 battles added" in capsys.readouterr().err
    with sa.create_engine(f"sqlite:///{db}").connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM battles")).scalar() == 5
        assert conn.execute(sa.text("SELECT count(DISTINCT uid) FROM battles")).scalar() == 5
