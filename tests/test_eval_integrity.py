"""herd eval's integrity checks, tried both ways: reports forged the ways an attacker would (edited answers
and scores outside the sample, fields that claim a check does not apply, look-alike model names, changed
task definitions) must fail `verify` or `compare` with the reason; genuine reports, also on the default
quantized path, must hold. Multiple choice against lm-evaluation-harness itself (its HF backend on the
same tiny Llama). Bad inputs (malformed reports, special files, huge texts, NaN weights) end in one named
error, never a traceback or a hang; a seeded fuzz over reports checks that at scale."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import herd
import herd.eval
from herd.errors import HerdError
from herd.eval.backends import EngineBackend, NonFiniteScore
from herd.eval.compare import MixedModels, MixedTasks, compare
from herd.eval.report import ReportError, load, save
from herd.eval.tasks import make_task
from herd.eval.tasks.generative import final_answer
from herd.eval.verify import verify
from tests.fixtures import build

ROOT = Path(__file__).resolve().parents[1]
MC_ITEMS = [
    {"context": "Question: What is 12 + 7?\nAnswer:", "choices": ["19", "21", "17"], "label": 0},
    {"context": "The cat sat on the ", "choices": ["mat", "moon", "sofa"], "label": 0},
    {"context": "Colours: red, green and", "choices": ["blue", "seven", "quickly", "the"], "label": 0},
    {"context": "One two three", "choices": ["four", "five"], "label": 1},
]


@pytest.fixture(scope="module")
def tiny():
    path = build.reference("llama3").gguf("F32")
    return path, herd.load(path, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def genuine(tiny, tmp_path_factory):
    """A report of two tasks on the tiny float32 Llama, saved and read back as a verifier reads it."""
    _, llm = tiny
    data = tmp_path_factory.mktemp("integrity") / "mc.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in MC_ITEMS))
    report = herd.eval.evaluate(llm, ["mc-arithmetic", "mc"], data=str(data), limit=12, seed=1, batch_size=4)
    path = data.with_name("report.json")
    save(report, path)
    return load(path), data


def forged(report: dict) -> dict:
    return copy.deepcopy(report)


def recompute_metrics(report: dict, index: int) -> None:
    """What a careful forger does after editing items: the metrics from the edited scores."""
    task = report["tasks"][index]
    built = herd.eval.tasks.task_from_definition(task["definition"])
    task["metrics"] = json.loads(json.dumps(built.aggregate(task["items"]).metrics))


def test_genuine_report_holds_sampled_and_full(tiny, genuine):
    _, llm = tiny
    report, _ = genuine
    full = verify(report, EngineBackend(llm, 4), sample=None)
    assert full.ok and full.status == "holds", full.findings + full.unverified
    sampled = verify(report, EngineBackend(llm, 4), sample=3)
    assert sampled.ok, sampled.findings + sampled.unverified
    assert any("3 of 12 items scored again: the same outputs, exactly" in c for c in sampled.checked)


def test_forged_answers_and_scores_fail_even_outside_the_sample(tiny, genuine):
    """Finding 1: wrong items edited to right, metrics recomputed, outputs kept: caught for every item,
    whatever the sample, because answers and scores are derived again from the recorded outputs."""
    _, llm = tiny
    report, _ = genuine
    bad = forged(report)
    items = bad["tasks"][0]["items"]
    wrong = [r for r in items if r["answer"] != r["target"]]
    assert wrong, "the tiny model gets every sum right: nothing to forge"
    for r in wrong:
        r["answer"] = r["answer_norm"] = r["answer_bytes"] = r["target"]
        r["score"] = {"acc": 1.0, "acc_norm": 1.0, "acc_bytes": 1.0}
    recompute_metrics(bad, 0)
    assert bad["tasks"][0]["metrics"]["acc"]["value"] == 1.0
    backend = EngineBackend(llm, 4)
    for sample in (1, None):
        v = verify(bad, backend, sample=sample)
        assert not v.ok and v.status == "does NOT hold"
        for r in wrong[:3]:
            assert any(f"item {r['id']}: answer is {r['target']} in the report, but its recorded outputs" in f
                       for f in v.findings), v.findings
    # the sample is drawn fresh each run (and printed), so a forger cannot aim outside it
    seeds = {verify(report, backend, sample=1).seed for _ in range(3)}
    assert len(seeds) == 3
    again = verify(report, backend, sample=1, seed=next(iter(seeds)))
    assert f"sample seed {again.seed}" in again.checked[-1]


def test_an_edited_output_is_caught_where_sampled(tiny, genuine):
    _, llm = tiny
    report, _ = genuine
    bad = forged(report)
    record = bad["tasks"][1]["items"][2]
    record["output"][0] += 1e-6  # a log-likelihood nudged: the re-scored sample runs the same forwards exactly
    v = verify(bad, EngineBackend(llm, 4), sample=None)
    assert not v.ok and any(f"item {record['id']}: output is" in f for f in v.findings)


@pytest.mark.parametrize("edit,expected", [
    (lambda r: r["tasks"][0]["definition"].update(kind="lm-eval"), "NOT"),
    (lambda r: r["model"].update(weights_known=False), "says its weights are unknown, yet names a fingerprint"),
    (lambda r: r["model"].update(weights_known=False, fingerprint=None), "names no fingerprint"),
    (lambda r: r["tasks"][0]["metrics"].update(acc_cheat={"value": 1.0, "stderr": 0.0, "n": 12}),
     "metrics.acc_cheat is in the report, but the task has no such figure"),
    (lambda r: r["tasks"][0]["metrics"].pop("acc_norm"), "metrics.acc_norm is missing from the report"),
    (lambda r: r.update(tasks=[]), "holds no tasks"),
    (lambda r: r["tasks"][1].update(data={}), "no SHA-256 of its data"),
    (lambda r: r["tasks"][1]["metrics"]["acc"].update(stderr=0.001), "metrics.acc.stderr is 0.001 in the report"),
    (lambda r: r["tasks"][0]["definition"].update(digits=1), "item sum-0: prompt_sha256"),
    (lambda r: r["tasks"][0]["definition"].update(version=1), "NOT"),
    (lambda r: r["tasks"][1]["items"].pop(), "is missing from the report"),
])
def test_a_report_cannot_switch_off_verify_checks(tiny, genuine, edit, expected):
    """Finding 2 (and 24's edited standard error): fields that would skip a check make the report fail or
    'not verified', never hold."""
    _, llm = tiny
    report, _ = genuine
    bad = forged(report)
    edit(bad)
    v = verify(bad, EngineBackend(llm, 4), sample=1)
    assert not v.ok and v.status != "holds"
    assert any(expected in line for line in v.findings + v.unverified) or (expected == "NOT" and v.unverified), (
        v.findings, v.unverified)


def test_verify_cli_exit_codes(tiny, genuine, tmp_path, capsys):
    from herd.cli import main

    path, _ = tiny
    report, _ = genuine
    good = tmp_path / "good.json"
    save(report, good)
    assert main(["eval", "verify", str(good), str(path), "--dtype", "float32", "--sample", "2"]) == 0
    assert "the report holds for these weights" in capsys.readouterr().out
    lm = forged(report)
    lm["tasks"][0]["definition"]["kind"] = "lm-eval"
    save(lm, tmp_path / "lm.json")
    assert main(["eval", "verify", str(tmp_path / "lm.json"), str(path), "--dtype", "float32", "--sample", "1"]) == 3
    out = capsys.readouterr().out
    assert "NOT verified" in out and "holds for these weights" not in out


def test_data_paths_are_absolute_so_verify_runs_from_anywhere(tiny, tmp_path, monkeypatch):
    _, llm = tiny
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "mc.jsonl").write_text("".join(json.dumps(i) + "\n" for i in MC_ITEMS))
    monkeypatch.chdir(tmp_path / "a")
    report = herd.eval.evaluate(llm, ["mc"], data="mc.jsonl", batch_size=4)
    assert report["tasks"][0]["definition"]["data"] == str(tmp_path / "a" / "mc.jsonl")
    monkeypatch.chdir(tmp_path)
    assert verify(report, EngineBackend(llm, 4), sample=1).ok


def test_default_quantized_path_report_verifies(smollm2_path, smollm2_q, tmp_path, capsys):
    """Finding 17: a genuine report on the default (quantized, bf16-activation) path holds under a sample
    smaller than the task, through the CLI as a newcomer runs it. The invariant: re-scoring runs the sample
    in the same forwards the run scored it in, so the log-likelihoods are the same numbers, exactly."""
    from herd.cli import main

    out = tmp_path / "report.json"
    assert main(["eval", str(smollm2_path), "--task", "mc-arithmetic", "--limit", "8", "--batch-size", "4",
                 "--out", str(out)]) == 0
    assert load(out)["runtime"]["weights_quantized"] is True
    capsys.readouterr()
    assert main(["eval", "verify", str(out), str(smollm2_path), "--sample", "2"]) == 0
    text = capsys.readouterr().out
    assert "2 of 8 items scored again: the same outputs, exactly" in text and "holds for these weights" in text
    # and a sample on the same path computes exactly what scoring everything computes
    task = make_task("mc-arithmetic", limit=8)
    backend = EngineBackend(smollm2_q, 4)
    whole = {r["id"]: r for r in task.run(backend).items}
    part = task.run(backend, only={"sum-3", "sum-6"}).items
    assert [r["id"] for r in part] == ["sum-3", "sum-6"]
    assert all(r["output"] == whole[r["id"]]["output"] for r in part)


def test_compare_flags_look_alike_names_and_changed_tasks(tiny, genuine, tmp_path, capsys):
    """Finding 3: "smol" and "smol " or a Cyrillic "ѕmol" over other weights are one name to a reader;
    one task name with another definition (mc-arithmetic of 1 against 2 digits) is not one task."""
    _, llm = tiny
    report, _ = genuine
    a = forged(report)
    a["model"]["name"] = "smol"
    for spelling in ("smol ", "\u0455mol", "SMOL", "s\u200bmol"):
        b = forged(a)
        b["model"]["name"] = spelling
        b["model"]["fingerprint"] = "0" * 64
        with pytest.raises(MixedModels, match="different weights under one model name"):
            compare([a, b])
        same_weights = forged(a)
        same_weights["model"]["name"] = spelling
        text = compare([a, same_weights]).text()
        assert "look-alike model names" in text
    assert "look-alike" not in compare([a, forged(a)]).text()
    one_digit = herd.eval.evaluate(llm, ["mc-arithmetic"], limit=4, digits=1, batch_size=4)
    two_digits = herd.eval.evaluate(llm, ["mc-arithmetic"], limit=4, digits=2, batch_size=4)
    for r in (one_digit, two_digits):
        r["model"]["name"] = "smol"
    with pytest.raises(MixedTasks, match=r"'mc-arithmetic': digits=1 against digits=2"):
        compare([one_digit, two_digits])
    shown = compare([one_digit, two_digits], allow_different_tasks=True)
    assert {t for t, _, _ in shown.rows} == {"mc-arithmetic [digits=1]", "mc-arithmetic [digits=2]"}
    assert "FLAG: task 'mc-arithmetic' has 2 different definitions" in shown.text()
    from herd.cli import main

    for i, r in enumerate((one_digit, two_digits)):
        save(r, tmp_path / f"{i}.json")
    assert main(["eval", "compare", str(tmp_path / "0.json"), str(tmp_path / "1.json")]) == 2
    assert "different definitions" in capsys.readouterr().err


LM_EVAL_ITEMS = [  # contexts ending in whitespace, and choices whose characters and UTF-8 bytes differ
    {"context": "It reads: 6", "choices": ["°C", "100 °F", "ab"], "label": 0},
    {"context": "Water boils at ", "choices": ["100°C", "212 F", "°°°°", "xy"], "label": 0},
    {"context": "Degrees: ", "choices": ["°°°°°°", "abc"], "label": 1},
]


def test_multiple_choice_scores_equal_lm_eval(tmp_path):
    """Finding 23: herd's mc task against lm-eval's own multiple-choice task (its HF backend, the same tiny
    Llama): per item the same log-likelihoods, acc, acc_norm (characters) and acc_bytes (UTF-8 bytes)."""
    pytest.importorskip("lm_eval")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    ref = build.reference("llama3")
    path = ref.gguf("F32")
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in LM_EVAL_ITEMS), encoding="utf-8")
    (tmp_path / "t.yaml").write_text(
        "task: herdmcx\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n  - metric: acc_bytes\n")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf = HFLM(pretrained=ref.model, tokenizer=tok, batch_size=1, max_length=48)
    results = lm_eval.simple_evaluate(model=hf, tasks=["herdmcx"], task_manager=TaskManager(include_path=str(tmp_path)),
                                      log_samples=True)
    samples = sorted(results["samples"]["herdmcx"], key=lambda s: s["doc_id"])
    assert any(s["acc_norm"] != s["acc_bytes"] for s in samples)  # the items tell characters from bytes
    llm = herd.load(path, device="cpu", dtype="float32")
    ours = make_task("mc", data=str(data)).run(EngineBackend(llm, 4))
    for s, record in zip(samples, ours.items):
        assert record["output"] == pytest.approx([r[0] for r in s["filtered_resps"]], abs=1e-4)
        assert record["score"] == {"acc": s["acc"], "acc_norm": s["acc_norm"], "acc_bytes": s["acc_bytes"]}
    for metric in ("acc", "acc_norm", "acc_bytes"):
        assert ours.metrics[metric]["value"] == pytest.approx(results["results"]["herdmcx"][f"{metric},none"])


def test_nan_weights_fail_at_the_first_scores(tiny):
    """Finding 14: weights that give NaN log-likelihoods stop the run with a named error before anything is
    aggregated or saved."""
    path, _ = tiny
    broken = herd.load(path, device="cpu", dtype="float32")
    with torch.no_grad():
        broken.model.norm.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteScore, match="NaN"):
        herd.eval.evaluate(broken, ["mc-arithmetic"], limit=3, batch_size=4)


def test_chain_of_thought_reads_the_final_answer():
    """Finding 24: GSM8K's chain-of-thought extraction: the number after the last "the answer is", else the
    last number; never the first number of the working."""
    assert final_answer("a = 42. b = a + 3 = 45. So the answer is 45.") == "45"
    assert final_answer("a = 42, then 43, then 45") == "45"
    assert final_answer("The answer is 12. Check: 12 - 2 = 10, yes.") == "12"
    assert final_answer("no digits") is None
    task = make_task("reasoning", steps=[1], per_depth=1)
    assert task.extract_cot("a = 42 ... the answer is 45") == "45"
    assert task.extract("42 and then 45") == {"answer": "42"}  # the greedy completion of "The answer is"


def test_reasoning_html_shows_greedy_against_voted(tiny, tmp_path):
    from herd.eval.html import render

    _, llm = tiny
    report = herd.eval.evaluate(llm, ["reasoning"], steps=[1, 2], per_depth=2, self_consistency=2, max_tokens=4,
                                batch_size=4)
    page = render(report)
    table = report["tasks"][0]["tables"]["accuracy by depth"]
    assert set(table["voted_rows"]) == {"1", "2"}
    assert "greedy" in table["text"] and "voted" in table["text"] and "voted" in page


def test_contamination_says_what_it_could_not_check(tmp_path):
    from herd.eval.contamination import Suspicion, ngram_overlap, table

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one two three four five six seven\n")
    overlap = ngram_overlap({"short": "one two", "long": "one two three four five six"}, corpus, 5)
    assert overlap == {"short": None, "long": 1.0}
    text = table([Suspicion("long", 1.0, -1, -1, 6), Suspicion("short", None, -1, -1, 2)], n=5)
    assert text.splitlines()[0].split()[1] == "5-gram" and "13-gram" not in text
    assert "too short" in text and "not checked" in text


def test_gsm8k_without_a_train_split_is_refused_before_loading(tmp_path, capsys):
    from herd.cli import main

    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    assert main(["eval", str(tmp_path / "no-such-model.gguf"), "--task", "gsm8k", "--data", str(test)]) == 2
    err = capsys.readouterr().err
    assert "train.jsonl" in err and "--shots 0" in err and "no-such-model" not in err


@contextlib.contextmanager
def deadline(seconds: int):
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def one_line_error(capsys, code: int, *needles: str) -> None:
    captured = capsys.readouterr()
    assert code == 2, captured
    err = captured.err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def test_special_files_are_refused_not_read(tiny, genuine, tmp_path, capsys):
    """Finding 11: /dev/zero, a FIFO or a directory as data, for eval and for verify, end at once."""
    from herd.cli import main

    path, llm = tiny
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with deadline(60):
        for special, kind in (("/dev/zero", "a device"), (str(fifo), "a FIFO"), (str(tmp_path), "a directory")):
            for task in ("perplexity", "mc"):
                code = main(["eval", str(path), "--task", task, "--data", special])
                one_line_error(capsys, code, special, kind)
        report, _ = genuine
        bad = forged(report)
        bad["tasks"][1]["definition"]["data"] = str(fifo)
        v = verify(bad, EngineBackend(llm, 4), sample=1)
        assert not v.ok and any("is a FIFO, not a regular file" in f for f in v.findings)
        assert not verify(report, EngineBackend(llm, 4), sample=1, data={"mc": "/dev/zero"}).ok


def test_malformed_reports_and_data_are_one_line_errors(tiny, genuine, tmp_path, capsys):
    """Finding 13: each names the input and what is wrong, with exit 2 and no traceback, before the model
    loads (the source given does not exist)."""
    from herd.cli import main

    path, _ = tiny
    report, data = genuine
    missing_model = str(tmp_path / "absent.gguf")
    cases = [
        (lambda r: r.update(tasks="x"), "tasks must be a list"),
        (lambda r: r["tasks"][0].update(items=5), "tasks[0].items must be a list"),
        (lambda r: r["tasks"][0]["items"][0].pop("id"), "tasks[0].items[0] has no 'id'"),
        (lambda r: r.update(signature="x"), "signature must be an object"),
        (lambda r: r["model"].update(files=[{"name": 3}]), "model.files[0] has no 'sha256'"),
    ]
    for i, (edit, message) in enumerate(cases):
        bad = forged(report)
        edit(bad)
        p = tmp_path / f"bad{i}.json"
        p.write_text(json.dumps(bad))
        one_line_error(capsys, main(["eval", "verify", str(p), missing_model]), str(p), message)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    one_line_error(capsys, main(["eval", "verify", str(deep), missing_model]), "nested too deeply")
    nan = tmp_path / "nan.json"
    with_nan = forged(report)
    with_nan["tasks"][0]["metrics"]["acc"]["value"] = float("nan")
    nan.write_text(json.dumps(with_nan, allow_nan=True))
    one_line_error(capsys, main(["eval", "compare", str(nan)]), "NaN")
    good = tmp_path / "good.json"
    save(report, good)
    one_line_error(capsys, main(["eval", "verify", str(good), missing_model, "--public-key", str(tmp_path / "none.pub")]),
                   "none.pub", "does not exist")
    bad_utf8 = tmp_path / "bad.jsonl"
    bad_utf8.write_bytes(json.dumps(MC_ITEMS[0]).encode() + b"\n" + b'{"context": "\xff\xfe"}\n')
    deep_data = tmp_path / "deep.jsonl"
    deep_data.write_text('{"context": ' + "[" * 50_000 + "]" * 50_000 + "}\n")
    for bad, message in ((bad_utf8, "bad.jsonl:2: not UTF-8"), (deep_data, "deep.jsonl:1: JSON nested too deeply")):
        one_line_error(capsys, main(["eval", str(path), "--dtype", "float32", "--task", "mc", "--data", str(bad)]),
                       message)


def test_perplexity_limit_reads_only_what_it_needs(tiny, tmp_path):
    """Finding 10: --limit 2 on a 50 MB text tokenizes a prefix, not the text (peak RSS of the process well
    under what tokenizing 50 MB takes); and the windows are the whole text's first windows."""
    path, llm = tiny
    line = "The quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 3 + "\n"
    big = tmp_path / "big.txt"
    with open(big, "w", encoding="utf-8") as f:
        f.write(line * (50_000_000 // len(line)))
    backend = EngineBackend(llm, 4)
    small = tmp_path / "small.txt"
    small.write_text(line * 400, encoding="utf-8")
    from herd.eval.tasks.perplexity import rolling_windows

    whole = rolling_windows(backend.encode(small.read_text(), bos=False), backend.prefix_token_id, 32)
    assert make_task("perplexity", data=str(small), context=32, limit=5).windows(backend) == whole[:5]
    script = (f"import resource, sys; from herd.cli import main; code = main(['eval', {str(path)!r}, '--dtype', "
              f"'float32', '--task', 'perplexity', '--data', {str(big)!r}, '--limit', '2', '--context', '32']); "
              # VmHWM: this process's own peak (ru_maxrss carries the forking pytest's peak across exec)
              "print('peak', next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))); "
              "sys.exit(code)")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
    peak_kib = int(run.stdout.split("peak")[-1])
    assert peak_kib < 1_500_000, f"peak RSS {peak_kib / 1e6:.2f} GB"
    assert "bits_per_byte" in run.stdout


MUTATIONS = ["delete", "string", "number", "negative", "huge", "nan", "list", "dict", "null", "bool", "deep"]


def _paths(value, at=()):
    yield at
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, at + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            yield from _paths(v, at + (i,))


def _mutate(report: dict, rng: random.Random) -> str:
    """The report's JSON with one to three values deleted or replaced by another kind of value."""
    r = copy.deepcopy(report)
    deep = "[" * 5000 + "]" * 5000
    for _ in range(rng.randint(1, 3)):
        at = rng.choice([p for p in _paths(r) if p])
        parent = r
        for k in at[:-1]:
            parent = parent[k]
        how = rng.choice(MUTATIONS)
        if how == "delete":
            del parent[at[-1]]
        else:
            parent[at[-1]] = {"string": "x", "number": 7, "negative": -3, "huge": 10 ** 30, "nan": float("nan"),
                              "list": [1, "a"], "dict": {"k": 1}, "null": None, "bool": True, "deep": "DEEP"}[how]
    return json.dumps(r, allow_nan=True).replace('"DEEP"', deep)


def test_fuzzed_reports_end_in_a_named_error_or_a_verdict(tiny, genuine, tmp_path):
    """A seeded fuzz over eval reports: 200 reports with keys deleted, values of the wrong type, NaN, huge
    numbers or deep nesting; load, verify, compare and render each end in a herd error or an answer, never
    another exception, within a deadline."""
    _, llm = tiny
    _, data = genuine
    report = json.loads(json.dumps(herd.eval.evaluate(llm, ["mc-arithmetic", "mc"], data=str(data), limit=3,
                                                      batch_size=4)))
    backend = EngineBackend(llm, 4)
    assert verify(report, backend, sample=1).ok
    rng = random.Random(23)
    outcomes = {"refused": 0, "verdict": 0}
    path = tmp_path / "fuzzed.json"
    for case in range(200):
        path.write_text(_mutate(report, rng))
        with deadline(30):
            try:
                r = load(path)
            except ReportError as e:
                assert str(path) in str(e)
                outcomes["refused"] += 1
                continue
            try:
                v = verify(r, backend, sample=1, seed=case)
                assert v.status in ("holds", "does NOT hold", "is NOT verified")
                compare([r, r], allow_different_models=True, allow_different_tasks=True).text()
                outcomes["verdict"] += 1
            except HerdError:
                outcomes["refused"] += 1
    assert outcomes["refused"] > 50 and outcomes["verdict"] > 50, outcomes
