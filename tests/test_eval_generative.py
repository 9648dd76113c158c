"""Generative tasks where the answer is certain: GSM8K extraction on hand-written outputs (lm-eval's
regexes), retrieval and multi-step reasoning scored by an oracle that reads the answer out of the prompt
with its own parser (scores 1) and by a random guesser (scores near chance), self-consistency's vote, the
plots; then a short run on SmolLM2."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

import herd
import herd.eval
from herd.eval.backends import EngineBackend, GenerateResult
from herd.eval.plots import task_plots
from herd.eval.tasks import make_task
from herd.eval.tasks.gsm8k import flexible_answer, strict_answer
from tests.fixtures import build

DATA = Path(__file__).parent / "data" / "gsm8k"


class Scripted:
    """A backend whose completions come from a function of the prompt and the request."""

    kind = "scripted"

    def __init__(self, answer, tokenizer_backend=None):
        self.answer = answer
        self.inner = tokenizer_backend
        self.context = 100_000
        self.prefix_token_id = 0
        self.calls = 0

    def encode(self, text, bos=None):
        return self.inner.encode(text, bos) if self.inner else list(text.encode())

    def decode(self, ids):
        return self.inner.decode(ids) if self.inner else bytes(ids).decode(errors="replace")

    def generate(self, requests, progress=None):
        self.calls += 1
        out = []
        for r in requests:
            prompt = r.prompt if r.prompt is not None else r.messages[-1]["content"]
            text = self.answer(prompt, r)
            out.append(GenerateResult(text, "h" + str(hash(prompt)), len(prompt), len(text.split())))
        return out


@pytest.mark.parametrize("output,strict,flexible", [
    ("Janet sells 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18", "18", "18"),
    ("The answer is 1,234.", None, "1234"),
    ("#### 3,000\n", "3000", "3000"),
    ("So it costs $45.50 in total.", None, "45.50"),
    ("She has 5 apples, then 7, so 12.", None, "12"),
    ("#### -4", "-4", "-4"),
    ("I don't know.", None, None),
    ("#### 70000.", "70000", "70000"),
])
def test_gsm8k_extraction(output, strict, flexible):
    assert strict_answer(output) == strict
    assert flexible_answer(output) == flexible


def test_gsm8k_shots_prompt_and_scores():
    task = make_task("gsm8k", data=str(DATA / "test.jsonl"), shots=3, seed=1)
    items = task.items()
    assert len(items) == 12 and items[0].data["target"] == "18"  # Janet's ducks
    train = [json.loads(line) for line in (DATA / "train.jsonl").read_text().splitlines()]
    prompt, stops = task.prompt(items[0], cot=False)
    assert prompt.count("Question:") == 4 and prompt.endswith("Answer:") and "Question:" in stops
    shots = [t for t in train if t["question"] in prompt]
    assert len(shots) == 3 and all(t["answer"] in prompt for t in shots)
    again, _ = make_task("gsm8k", data=str(DATA / "test.jsonl"), shots=3, seed=1).prompt(items[0], False)
    other, _ = make_task("gsm8k", data=str(DATA / "test.jsonl"), shots=3, seed=2).prompt(items[0], False)
    assert again == prompt and other != prompt
    chat = make_task("gsm8k", data=str(DATA / "test.jsonl"), shots=2, chat=True)
    messages, _ = chat.prompt(chat.items()[0], False)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2 + ["user"]
    # hand-written outputs: item 0 strict and flexible right, item 1 only flexible, the rest wrong
    targets = {i.data["question"]: i.data["target"] for i in items}

    def answer(prompt, request):
        q = prompt.rsplit("Question: ", 1)[1].removesuffix("\nAnswer:")
        t = targets[q]
        if q.startswith("Janet"):
            return f"She sells 9 eggs.\n#### {t}"
        if q.startswith("A robe"):
            return f"It takes {t} bolts"
        return "#### 123456"

    result = task.run(Scripted(answer))
    assert result.metrics["strict_match"]["value"] == pytest.approx(1 / 12)
    assert result.metrics["flexible_match"]["value"] == pytest.approx(2 / 12)
    assert result.items[1]["answers"] == {"strict_match": None, "flexible_match": "3"}


def oracle_retrieval(prompt, request):
    name = re.search(r"What is the secret number of (\w+)\?", prompt).group(1)
    return " " + re.search(rf"The secret number of {name} is (\d+)\.", prompt).group(1) + "."


def solve(problem: str) -> str:
    """An independent solver of the reasoning problems: run the assignments, or walk the table."""
    if problem.startswith("Table:"):
        table = dict(map(int, pair.split(" -> ")) for pair in re.findall(r"\d+ -> \d+", problem))
        start, times = map(int, re.search(r"Start at (\d+) and follow the table (\d+) time", problem).groups())
        for _ in range(times):
            start = table[start]
        return str(start)
    env: dict = {}
    body, question = problem.split("\nQuestion: ")
    for stmt in body.split(". "):
        exec(stmt.rstrip("."), {}, env)
    return str(env[re.search(r"value of (\w+)", question).group(1)])


def test_retrieval_oracle_scores_one_and_a_guesser_chance(tmp_path):
    llm_backend = EngineBackend(herd.load(build.reference("llama3").gguf("F32"), device="cpu", dtype="float32"))
    task = make_task("retrieval", lengths=[256, 512], depths=[0.0, 0.5, 1.0], repeats=2, needles=2)
    items = task.items(llm_backend)
    assert len(items) == 12
    for item in items:
        n = len(llm_backend.encode(task.prompt(item, cot=False)[0]))
        assert item.data["length"] - 8 <= n <= item.data["length"]
        where = item.data["haystack"].index(f"The secret number of {item.data['name']} is")
        assert abs(where / len(item.data["haystack"]) - item.data["depth"]) < 0.2
    perfect = task.run(Scripted(oracle_retrieval, llm_backend))
    assert perfect.metrics["answer"]["value"] == 1.0
    table = perfect.tables["accuracy by length and depth"]
    assert table["cells"] == [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]] and table["lengths"] == [256, 512]
    rng = random.Random(0)
    many = make_task("retrieval", lengths=[128], depths=[0.0, 0.5, 1.0], repeats=60)
    guessed = many.run(Scripted(lambda p, r: f" {rng.randint(10, 99)}", llm_backend))
    assert guessed.metrics["answer"]["value"] < 0.06  # chance is 1/90
    png = task_plots({"definition": task.definition(), "tables": perfect.tables})["retrieval-heatmap"]
    assert png.startswith(b"\x89PNG")


def test_reasoning_oracle_scores_one_and_a_guesser_chance():
    task = make_task("reasoning", steps=[1, 2, 4, 8, 16], per_depth=9, seed=5)
    items = task.items()
    assert {i.data["family"] for i in items} == {"chain", "tracking", "lookup"}
    for item in items:
        assert solve(item.data["problem"]) == item.data["target"], item.data
    perfect = task.run(Scripted(lambda p, r: " " + solve(p.rsplit("\nAnswer:", 1)[0])))
    assert perfect.metrics["answer"]["value"] == 1.0
    assert set(perfect.tables["accuracy by depth"]["rows"]) == {"1", "2", "4", "8", "16"}
    rng = random.Random(1)
    guesser = Scripted(lambda p, r: f" {rng.randint(10, 99)}")
    guessed = make_task("reasoning", steps=[1, 2, 4], per_depth=60).run(guesser)
    assert guessed.metrics["answer"]["value"] < 0.06
    plots = task_plots({"definition": task.definition(), "tables": perfect.tables})
    assert plots["reasoning-by-depth"].startswith(b"\x89PNG")


def test_self_consistency_votes_and_reports_compute():
    """Greedy answers wrong; of three chain-of-thought samples two are right: the vote is right."""
    task = make_task("reasoning", steps=[2], per_depth=6, self_consistency=3, sc_temperature=0.8)

    def answer(prompt, request):
        right = solve(prompt.rsplit("\n", 1)[0].rsplit(" Let's think", 1)[0].rsplit("\nAnswer:", 1)[0])
        if request.temperature == 0:
            return " 0"
        assert "step by step" in prompt and request.seed is not None
        return f"First ... so the answer is {right if request.seed % 1009 != 2 else 11}."

    result = task.run(Scripted(answer))
    assert result.metrics["answer"]["value"] == 0.0
    assert result.metrics["self_consistency"]["value"] == 1.0
    assert result.compute["self_consistency_samples"] == 3 and result.compute["sc_temperature"] == 0.8
    assert result.compute["self_consistency_completion_tokens"] > result.compute["greedy_completion_tokens"]
    seeds = [r["self_consistency"]["answers"] for r in result.items]
    assert all(len(s) == 3 for s in seeds)


def test_generation_batch_1_and_16_on_float32():
    """Greedy generation through the engine at batch 1 and 16 on the float32 path: the decode step's
    [B, 1] products differ by batch, so the report bounds rather than promises; here they agree."""
    llm = herd.load(build.reference("llama3").gguf("F32"), device="cpu", dtype="float32")
    task = make_task("reasoning", steps=[1, 2], per_depth=8)
    one = task.run(EngineBackend(llm, 1)).items
    sixteen = task.run(EngineBackend(llm, 16)).items
    assert [r["output"] for r in one] == [r["output"] for r in sixteen]


def test_smollm2_end_to_end(smollm2_q, tmp_path):
    report = herd.eval.evaluate(smollm2_q, ["retrieval", "reasoning", "gsm8k"], lengths=[160], depths=[0.0, 1.0],
                                repeats=1, steps=[1, 2], per_depth=3, data=str(DATA / "test.jsonl"), shots=1,
                                limit=2, max_tokens=8, batch_size=8)
    names = [t["definition"]["task"] for t in report["tasks"]]
    assert names == ["retrieval", "reasoning", "gsm8k"]
    retrieval = report["tasks"][0]
    assert retrieval["metrics"]["answer"]["n"] == 2
    assert all(r["output"] and r["prompt_tokens"] > 100 for r in retrieval["items"])
    assert report["tasks"][2]["data"]["data"]["sha256"] and report["tasks"][2]["data"]["train"]["sha256"]
    from herd.eval.html import write_html

    page = write_html(report, tmp_path / "r.html").read_text()
    assert "data:image/png;base64," in page and report["model"]["fingerprint"] in page


def test_chat_mode_sends_hf_templated_prompts(smollm2_q, hf_smollm2):
    """With `chat`, retrieval and reasoning items go to the model as one user turn in its chat template:
    the token ids the engine saw (bound in each record's prompt_sha256) are HF's apply_chat_template's."""
    from herd.eval.data import sha256_json

    _, tok = hf_smollm2
    for name, options in (("retrieval", dict(lengths=[160], depths=[0.5], repeats=2)),
                          ("reasoning", dict(steps=[1, 2], per_depth=3))):
        task = make_task(name, chat=True, max_tokens=8, **options)
        result = task.run(EngineBackend(smollm2_q, 8))
        assert result.compute["generation"]["greedy"]["chat_template"] is True
        for item, record in zip(task.items(EngineBackend(smollm2_q)), result.items):
            messages, _ = task.prompt(item, cot=False)
            assert [m["role"] for m in messages] == ["user"] and not messages[0]["content"].endswith("Answer:")
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            assert record["prompt_sha256"] == sha256_json(ids) and record["prompt_tokens"] == len(ids)
            assert record["output"]
