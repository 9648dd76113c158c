"""herd as lm-evaluation-harness's model: the adapter's three request kinds against lm-eval's own HF
backend (HFLM) on the same tiny random Llama (float32), and `herd eval --lm-eval` on a task defined in a
local YAML file (no hub)."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the test task's data is a local file; nothing is fetched

import herd
from tests.fixtures import build

lm_eval = pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def models():
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from herd.eval.lm_eval_adapter import HerdLM

    ref = build.reference("llama3")
    path = ref.gguf("F32")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    llm = herd.load(path, device="cpu", dtype="float32")
    return HFLM(pretrained=ref.model, tokenizer=tok, batch_size=1, max_length=48), HerdLM(llm, max_length=48), path


def test_adapter_equals_lm_eval_hf_backend(models):
    from lm_eval.api.instance import Instance

    hf, ours, _ = models
    pairs = [("The cat sat on the ", "mat"), ("Question: 1+1?\nAnswer:", " 2"), ("", "hello"), ("abc", " def ghi")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    expected, got = hf.loglikelihood(reqs), ours.loglikelihood(reqs)
    assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], abs=1e-4)
    assert [g[1] for g in got] == [e[1] for e in expected]
    text = open(__file__.rsplit("/", 1)[0] + "/data/tinyshakespeare-40k.txt", encoding="utf-8").read()[:700]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate([text, text[:100]])]
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(hf.loglikelihood_rolling(rolling), abs=1e-3)
    gen = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 8}), i)
           for i, p in enumerate(["Once upon a time", "The king said"])]
    assert ours.generate_until(gen) == hf.generate_until(gen)


def test_herd_eval_lm_eval_cli_binds_the_fingerprint(models, tmp_path, capsys):
    from herd.cli import main
    from herd.eval.report import load

    _, ours, path = models
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"context": f"Item {i}: the answer is", "choices": ["yes", "no", "maybe"],
                                        "label": i % 3}) + "\n" for i in range(6)))
    (tmp_path / "herdmc.yaml").write_text(
        "task: herdmc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
        "    higher_is_better: true\n")
    out = tmp_path / "r.json"
    assert main(["eval", str(path), "--dtype", "float32", "--lm-eval", "herdmc", "--lm-eval-include", str(tmp_path),
                 "--out", str(out)]) == 0
    report = load(out)
    task = report["tasks"][0]
    assert task["definition"]["task"] == "lm-eval:herdmc" and report["model"]["fingerprint"] == ours.llm.fingerprint
    assert task["metrics"]["acc"]["n"] == 6 and len(task["items"]) == 6
    # the same items through herd's own multiple-choice task give the same accuracy
    import herd.eval

    own = herd.eval.evaluate(ours.llm, ["mc"], data=str(data))["tasks"][0]["metrics"]["acc"]["value"]
    assert task["metrics"]["acc"]["value"] == pytest.approx(own)
