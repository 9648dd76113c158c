"""Contamination: 13-gram overlap against a streamed corpus directory, and Min-K% / Min-K%++ against the
same statistics computed here from HF transformers' logits (tiny random Llama, float32)."""

from __future__ import annotations

import json

import pytest
import torch

import herd
from herd.eval.contamination import contamination, ngram_overlap
from herd.eval.tasks import make_task
from tests.fixtures import build

ITEMS = [
    {"context": "The quick brown fox jumps over the lazy dog while the farmer sleeps under the old oak tree by",
     "choices": ["the river", "a cloud"], "label": 0},
    {"context": "Seven bright stars rose above the quiet harbour as the fishing boats came slowly home again",
     "choices": ["tonight", "never"], "label": 0},
]


def test_ngram_overlap_streams_a_corpus_directory(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    # item 0 verbatim, broken across lines and punctuated differently; item 1 only in part
    (corpus / "a.txt").write_text("noise noise\nThe QUICK brown fox, jumps over the lazy dog\nwhile the farmer "
                                  "sleeps under the old oak tree by the river. more noise\n")
    (corpus / "sub" / "b.txt").write_text("seven bright stars rose above the quiet harbour as the fishing boats came\n")
    texts = {f"i{n}": i["context"] + " " + i["choices"][i["label"]] for n, i in enumerate(ITEMS)}
    overlap = ngram_overlap(texts, corpus, 13)
    assert overlap["i0"] == 1.0
    words1 = texts["i1"].lower().split()
    grams = len(words1) - 12
    assert overlap["i1"] == pytest.approx(1 / grams)  # exactly one 13-gram fits in b.txt
    assert ngram_overlap(texts, corpus / "sub", 13)["i0"] == 0.0


def test_min_k_equals_hf_logits(tmp_path):
    ref = build.reference("llama3")
    path = ref.gguf("F32")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    llm = herd.load(path, device="cpu", dtype="float32")
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    rows = {r.id: r for r in contamination(llm, make_task("mc", data=str(data)), None, k=0.2)}
    for n, item in enumerate(ITEMS, 1):
        ids = tok(item["context"] + " " + item["choices"][0])["input_ids"]
        with torch.no_grad():
            lp = ref.model(torch.tensor([ids])).logits[0].double().log_softmax(-1)[:-1]
        tgt = lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        mu = (lp.exp() * lp).sum(-1)
        sd = ((lp.exp() * lp * lp).sum(-1) - mu * mu).sqrt()
        k = max(1, int(len(tgt) * 0.2))
        r = rows[f"line-{n}"]
        assert r.min_k == pytest.approx(float(tgt.sort().values[:k].mean()), abs=1e-4)
        assert r.min_k_pp == pytest.approx(float(((tgt - mu) / sd).sort().values[:k].mean()), abs=1e-4)
        assert r.overlap is None


def test_contamination_cli(tmp_path, capsys):
    from herd.cli import main

    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(ITEMS[1]["context"] + " tonight\n")
    out = tmp_path / "c.json"
    path = build.reference("llama3").gguf("F32")
    assert main(["eval", "contamination", str(path), "--task", "mc", "--data", str(data), "--corpus", str(corpus),
                 "--dtype", "float32", "--out", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].startswith("line-2") and "1.000" in table[1]  # the item in the corpus comes first
    assert json.loads(out.read_text())["items"][0]["overlap"] == 1.0
