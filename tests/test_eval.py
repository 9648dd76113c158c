"""herd eval against independent references: HF transformers' tokenizer and logits on a tiny random Llama
(float32 GGUF, so both compute the same maths) with lm-evaluation-harness's rules for pair encoding and
rolling windows written out here from its documentation; herd serve through its HTTP API; the
`cryptography` package for signatures."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import herd
import herd.eval
from herd.errors import ContextOverflow
from herd.eval.backends import EngineBackend, ServerBackend
from herd.eval.compare import MixedModels, compare
from herd.eval.data import DataError
from herd.eval.report import load, save
from herd.eval.signing import check_signature, generate_key, sign
from herd.eval.tasks import make_task
from herd.eval.verify import verify
from tests.fixtures import build

TEXT = open(__file__.rsplit("/", 1)[0] + "/data/tinyshakespeare-40k.txt", encoding="utf-8").read()[:1500]
MC_ITEMS = [
    {"context": "Question: What is 12 + 7?\nAnswer:", "choices": ["19", "21", "17"], "label": 0},
    {"context": "The cat sat on the ", "choices": ["mat", "moon", "sofa"], "label": 0},  # ends in a space
    {"context": "", "choices": ["hello world", "xyzzy"], "label": 1},  # empty: read after the prefix token
    {"context": "Colours: red, green and", "choices": ["blue", "seven", "quickly", "the"], "label": 0},
    {"context": "One two three", "choices": ["four", "five"], "label": 0},
]


@pytest.fixture(scope="module")
def tiny():
    ref = build.reference("llama3")
    path = ref.gguf("F32")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    llm = herd.load(path, device="cpu", dtype="float32")
    return ref, path, tok, llm


@pytest.fixture
def mc_file(tmp_path):
    p = tmp_path / "mc.jsonl"
    p.write_text("".join(json.dumps(i) + "\n" for i in MC_ITEMS))
    return p


def hf_loglik(model, tok, context: str, continuation: str) -> float:
    """lm-eval's loglikelihood: trailing spaces of the context join the continuation; the continuation's
    tokens are what tokenizing context + continuation adds after the context's own tokens."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if context:
        whole = tok(context + continuation)["input_ids"]
        ctx = tok(context)["input_ids"]
        cont = whole[len(ctx):]
    else:
        ctx, cont = [tok.bos_token_id], tok(continuation, add_special_tokens=False)["input_ids"]
        whole = ctx + cont
    with torch.no_grad():
        logprobs = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return float(sum(logprobs[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_multiple_choice_logliks_equal_hf_transformers(tiny, mc_file):
    ref, _, tok, llm = tiny
    result = make_task("mc", data=str(mc_file)).run(EngineBackend(llm, batch_size=16))
    for item, record in zip(MC_ITEMS, result.items):
        # lm-eval's target delimiter " " comes before every choice, whatever the context ends with
        expected = [hf_loglik(ref.model, tok, item["context"], " " + c) for c in item["choices"]]
        assert record["output"] == pytest.approx(expected, abs=1e-4)
        assert record["answer"] == max(range(len(expected)), key=lambda i: expected[i])
        chars = [len(c) for c in item["choices"]]
        assert record["answer_norm"] == max(range(len(expected)), key=lambda i: expected[i] / chars[i])
    acc = result.metrics["acc"]
    scores = [r["score"]["acc"] for r in result.items]
    assert acc["n"] == 5 and acc["value"] == sum(scores) / 5
    mean = sum(scores) / 5
    assert acc["stderr"] == pytest.approx(math.sqrt(sum((s - mean) ** 2 for s in scores) / 4 / 5))


def hf_rolling(model, tok, text: str, window: int) -> list[float]:
    """lm-eval's own windows (its get_rolling_token_windows with context_len 1, then make_disjoint_window)
    scored on HF logits: each token predicted once."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = tok(text, add_special_tokens=False)["input_ids"]
    out = []
    for ctx, predicted in map(make_disjoint_window, get_rolling_token_windows(tokens, tok.bos_token_id, window, 1)):
        inp = (ctx + predicted)[:-1]
        assert len(inp) <= window
        with torch.no_grad():
            logprobs = model(torch.tensor([inp])).logits[0].float().log_softmax(-1)
        out.append(float(sum(logprobs[len(ctx) - 1 + i, t] for i, t in enumerate(predicted))))
    return out


def test_perplexity_equals_hf_logits_with_the_same_windows(tiny, tmp_path):
    ref, _, tok, llm = tiny
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    result = make_task("perplexity", data=str(path), context=48).run(EngineBackend(llm, batch_size=4))
    expected = hf_rolling(ref.model, tok, TEXT, 48)
    assert [r["output"] for r in result.items] == pytest.approx(expected, abs=1e-4)
    ll = sum(expected)
    words, nbytes = len(re.split(r"\s+", TEXT)), len(TEXT.encode())
    m = result.metrics
    assert m["word_perplexity"]["value"] == pytest.approx(math.exp(-ll / words), rel=1e-5)
    assert m["byte_perplexity"]["value"] == pytest.approx(math.exp(-ll / nbytes), rel=1e-5)
    assert m["bits_per_byte"]["value"] == pytest.approx(-ll / nbytes / math.log(2), rel=1e-5)
    assert m["bits_per_byte"]["n"] == len(expected) and m["bits_per_byte"]["stderr"] > 0


def test_in_process_equals_herd_serve_with_echo(tiny, mc_file, tmp_path):
    from herd.server import create_app
    from tests.fixtures.serving import ServerThread

    _, _, _, llm = tiny
    text = tmp_path / "text.txt"
    text.write_text(TEXT[:600], encoding="utf-8")
    tasks = [make_task("mc", data=str(mc_file)), make_task("perplexity", data=str(text), context=40)]
    local = [t.run(EngineBackend(llm, batch_size=8)) for t in tasks]
    engine = [t.run(EngineBackend(llm, batch_size=8, scoring="engine")) for t in tasks]
    app = create_app(llm, max_batch=8, context=256, model_id="tiny")
    with ServerThread(app) as srv:
        backend = ServerBackend(srv.url, batch_size=3)
        remote = [t.run(backend) for t in tasks]
        report = herd.eval.run.run_tasks(backend, tasks[:1], seed=0, source=srv.url)
        from herd.cli import main

        out = tmp_path / "served.json"
        assert main(["eval", "--server", srv.url, "--task", f"mc={mc_file}", "--task", "reasoning", "--steps", "1",
                     "--limit", "4", "--out", str(out)]) == 0
        served = load(out)
        assert served["model"]["fingerprint"] is None and served["runtime"]["server_url"] == srv.url
        local_reasoning = make_task("reasoning", steps=[1], limit=4).run(EngineBackend(llm, batch_size=8))
        assert [r["output"] for r in served["tasks"][1]["items"]] == [r["output"] for r in local_reasoning.items]
    for a, b in zip(local, remote):
        def flat(items):
            return [x for r in items for x in (r["output"] if isinstance(r["output"], list) else [r["output"]])]

        assert flat(a.items) == pytest.approx(flat(b.items), abs=1e-5)
    for a, b in zip(engine, remote):  # the same engine in and out of herd serve; which prompts share a forward differs
        assert flat(a.items) == pytest.approx(flat(b.items), rel=1e-6, abs=1e-6)
        assert [r["prompt_sha256"] for r in a.items] == [r["prompt_sha256"] for r in b.items]
    assert report["model"]["weights_known"] is False and report["model"]["fingerprint"] is None
    assert "unknown" in report["model"]["note"]


def test_what_batch_size_moves(tiny, mc_file):
    """Batch size 1 against 16, for both scorers (rows padded into one [B, T] forward, or the engine's
    batched prefill): the matrix products' shapes change with the batch, so values differ in the last bits,
    within the bound the report states, and no decision moves. At one batch size a run repeats exactly."""
    _, _, _, llm = tiny
    task = make_task("mc", data=str(mc_file))
    one = task.run(EngineBackend(llm, batch_size=1, scoring="engine")).items
    sixteen = task.run(EngineBackend(llm, batch_size=16, scoring="engine")).items
    assert json.dumps(sixteen) == json.dumps(task.run(EngineBackend(llm, batch_size=16, scoring="engine")).items)
    for a, b in zip(one, sixteen):
        assert a["answer"] == b["answer"]
        assert a["output"] == pytest.approx(b["output"], rel=1e-6, abs=1e-6)
    b1 = task.run(EngineBackend(llm, batch_size=1)).items
    b16 = task.run(EngineBackend(llm, batch_size=16)).items
    for a, b, c in zip(b1, b16, one):
        assert a["answer"] == b["answer"] == c["answer"] and a["answer_norm"] == b["answer_norm"]
        for x, y, z in zip(a["output"], b["output"], c["output"]):
            assert abs(x - y) <= 1e-6 * max(1.0, abs(x)) and abs(x - z) <= 1e-6 * max(1.0, abs(x))


def test_same_seed_same_bytes_and_report_fields(tiny, mc_file):
    _, path, _, llm = tiny
    a = herd.eval.evaluate(llm, ["mc-arithmetic", "mc"], data=str(mc_file), limit=6, seed=3, batch_size=4)
    b = herd.eval.evaluate(llm, ["mc-arithmetic", "mc"], data=str(mc_file), limit=6, seed=3, batch_size=4)
    assert json.dumps(a["tasks"]) == json.dumps(b["tasks"])
    c = herd.eval.evaluate(llm, ["mc-arithmetic"], limit=6, seed=4, batch_size=4)
    assert c["tasks"][0]["items"] != a["tasks"][0]["items"]  # the seed chooses the items
    m, rt = a["model"], a["runtime"]
    assert m["fingerprint"] == llm.fingerprint and m["files"][0]["sha256"] == herd.eval.data.sha256_file(path)
    assert m["tokenizer_sha256"] and m["quantization"] and len(m["tensor_sha256"]) == len(llm.checkpoint.tensors)
    assert rt["dtype"] == "float32" and rt["threads"] >= 1 and rt["batch_size"] == 4
    assert {"herd", "torch", "python"} <= set(rt["versions"])
    task = a["tasks"][1]
    assert task["data"]["data"]["sha256"] == herd.eval.data.sha256_file(mc_file)
    assert task["definition"]["task"] == "mc" and task["definition"]["data"] == str(mc_file)
    item = task["items"][0]
    assert {"id", "prompt_sha256", "output", "answer", "target", "score"} <= set(item)
    assert all(set(s) == {"value", "stderr", "n"} for s in task["metrics"].values())


def test_verify_holds_and_catches_tampering(tiny, mc_file, tmp_path):
    _, _, _, llm = tiny
    report = herd.eval.evaluate(llm, ["mc"], data=str(mc_file), seed=0, batch_size=4)
    backend = EngineBackend(llm, 4)
    assert verify(report, backend, sample=None).ok
    edited = json.loads(json.dumps(report))
    edited["tasks"][0]["metrics"]["acc"]["value"] = 0.99
    v = verify(edited, backend, sample=2)
    assert not v.ok and any("metrics.acc.value is 0.99" in f for f in v.findings)
    removed = json.loads(json.dumps(report))
    gone = removed["tasks"][0]["items"].pop(1)
    removed["tasks"][0]["metrics"] = herd.eval.tasks.make_task("mc", data=str(mc_file)).aggregate(
        removed["tasks"][0]["items"]).metrics  # a careful forger recomputes the metrics too
    v = verify(removed, backend, sample=2)
    assert not v.ok and any(f"item {gone['id']} is missing" in f for f in v.findings)
    flipped = json.loads(json.dumps(report))
    rec = flipped["tasks"][0]["items"][0]
    rec["output"][0] += 0.5  # one log-likelihood edited: caught when that item is re-scored
    v = verify(flipped, backend, sample=None)
    assert not v.ok and any("item line-1: output" in f for f in v.findings)
    mc_file.write_text(mc_file.read_text().replace("mat", "rug"))
    v = verify(report, backend, sample=2)
    assert not v.ok and any("has SHA-256" in f for f in v.findings)


def test_one_changed_weight_changes_the_fingerprint_and_verify_names_it(tiny, mc_file, tmp_path):
    ref, _, _, llm = tiny
    report = herd.eval.evaluate(llm, ["mc"], data=str(mc_file), batch_size=4)
    model = build.make_model("llama3")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 0.01
    changed = build.write_gguf(model, "llama3", tmp_path / "changed.gguf")
    other = herd.load(changed, device="cpu", dtype="float32")
    assert other.fingerprint != llm.fingerprint
    v = verify(report, EngineBackend(other, 4), sample=None)
    assert not v.ok
    assert any("fingerprint differs" in f for f in v.findings)
    assert "tensor layers.1.feed_forward.w2.weight differs" in v.findings
    assert sum(f.startswith("tensor ") for f in v.findings) == 1


def test_signatures(tiny, mc_file, tmp_path):
    _, _, _, llm = tiny
    report = herd.eval.evaluate(llm, ["mc"], data=str(mc_file), batch_size=4, limit=2)
    key_a, pub_a = generate_key(tmp_path / "a.key")
    _, pub_b = generate_key(tmp_path / "b.key")
    signed = sign(report, key_a)
    assert check_signature(signed) == [] and check_signature(signed, pub_a) == []
    assert any("not by" in p for p in check_signature(signed, pub_b))
    assert check_signature(report, pub_a) == ["the report is not signed"]
    edited = json.loads(json.dumps(signed))
    edited["tasks"][0]["metrics"]["acc"]["value"] = 1.0
    assert any("changed after it was signed" in p for p in check_signature(edited))
    # the cryptography package's own verification of what herd wrote
    import base64

    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    load_pem_public_key(pub_a.read_bytes()).verify(base64.b64decode(signed["signature"]["value"]),
                                                   herd.eval.digest(signed).encode())
    assert not verify(signed, EngineBackend(llm, 4), sample=1, public_key=pub_b).ok
    assert verify(signed, EngineBackend(llm, 4), sample=1, public_key=pub_a).ok


def test_compare_refuses_one_name_with_two_fingerprints(tiny, mc_file):
    _, _, _, llm = tiny
    a = herd.eval.evaluate(llm, ["mc"], data=str(mc_file), batch_size=4, limit=2)
    b = json.loads(json.dumps(a))
    b["model"]["fingerprint"] = "0" * 64  # the same name, other weights (the leaderboard variant)
    c = json.loads(json.dumps(a))
    c["model"]["fingerprint"] = "1" * 64
    same = compare([a, json.loads(json.dumps(a))])
    assert not same.flagged and same.variants == {a["model"]["name"]: 1}
    with pytest.raises(MixedModels, match=a["model"]["name"]):
        compare([a, b])
    shown = compare([a, b, c], allow_different_models=True)
    assert shown.flagged == {a["model"]["name"]: [a["model"]["fingerprint"], "0" * 64, "1" * 64]}
    assert shown.variants[a["model"]["name"]] == 3
    text = shown.text()
    assert "FLAG" in text and "3 variants" in text and "acc" in text


def test_bad_input_is_named(tiny, tmp_path):
    _, _, _, llm = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(MC_ITEMS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        make_task("mc", data=str(bad)).items()
    bad.write_text(json.dumps(MC_ITEMS[0]) + "\n" + json.dumps({"context": "x", "choices": ["a", "b"]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing field 'label'"):
        make_task("mc", data=str(bad)).items()
    bad.write_text(json.dumps({"context": "x", "choices": ["a", "b"], "label": 2}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'label' is 2"):
        make_task("mc", data=str(bad)).items()
    with pytest.raises(ContextOverflow, match="exceeds"):
        make_task("perplexity", context=10**6).run(EngineBackend(llm))
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"context": "word " * 9000, "choices": ["a", "b"], "label": 0}) + "\n")
    with pytest.raises(ContextOverflow, match="exceed the model's context"):
        make_task("mc", data=str(long)).run(EngineBackend(llm))


def test_cli_eval_verify_sign_compare(tiny, mc_file, tmp_path, capsys):
    from herd.cli import main

    _, path, _, _ = tiny
    out, out2 = tmp_path / "r.json", tmp_path / "r2.json"
    assert main(["eval", str(path), "--task", f"mc={mc_file}", "--task", "mc-arithmetic", "--limit", "4",
                 "--dtype", "float32", "--out", str(out), "--name", "tiny"]) == 0
    assert "acc" in capsys.readouterr().out
    report = load(out)
    assert [t["definition"]["task"] for t in report["tasks"]] == ["mc", "mc-arithmetic"]
    assert main(["eval", "verify", str(out), str(path), "--sample", "2"]) == 0
    assert "holds" in capsys.readouterr().out
    assert main(["eval", "keygen", str(tmp_path / "k")]) == 0
    assert main(["eval", "sign", str(out), "--key", str(tmp_path / "k"), "--out", str(out2)]) == 0
    assert main(["eval", "verify", str(out2), str(path), "--sample", "1", "--public-key", str(tmp_path / "k.pub")]) == 0
    report["tasks"][1]["items"].pop()
    save(report, out)
    assert main(["eval", "verify", str(out), str(path), "--sample", "1"]) == 1
    assert "is missing from the report" in capsys.readouterr().out
    assert main(["eval", "compare", str(out2), str(out2)]) == 0
    assert "mc-arithmetic" in capsys.readouterr().out
