"""Generative tasks with answer extraction, and the reasoning mode every one of them has.

A task gives each item a prompt (text, or chat messages with `chat`), stop strings and a target; the
model's greedy completion is scored by the task's extractors. With `self_consistency` K the task also
asks for a chain of thought (the task's `cot_instruction`), samples K completions at `sc_temperature`
with seeds fixed by the item and the run's seed, extracts an answer from each and takes the majority
(ties: the answer seen first); both scores are reported with the tokens each generated.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

from herd.eval.backends import GenerateRequest
from herd.eval.data import sha256_text
from herd.eval.metrics import mean_score
from herd.eval.tasks.base import Bar, Item, Task, TaskResult

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def first_number(text: str) -> str | None:
    m = NUMBER.search(text)
    return normalize_number(m.group(0)) if m else None


def last_number(text: str) -> str | None:
    found = NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def normalize_number(text: str) -> str:
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", text):
        text = text.split(".")[0]
    return text


def majority(answers: list[str | None]) -> str | None:
    counted = Counter(a for a in answers if a is not None)
    if not counted:
        return None
    best = max(counted.values())
    return next(a for a in answers if a is not None and counted[a] == best)


def _settings(r: GenerateRequest) -> dict:
    return {"max_tokens": r.max_tokens, "temperature": r.temperature, "stop": list(r.stop),
            "chat_template": r.messages is not None, "seeded": r.seed is not None,
            "plus": "the model's end-of-turn tokens, and the chat format's with chat_template"}


@dataclass
class GenerativeTask(Task):
    """Subclasses define items(), prompt(item, cot), extractors and optionally tables()."""

    kind: ClassVar[str] = "generative"
    exact_fields: ClassVar[tuple[str, ...]] = ("prompt_sha256", "output", "answer", "score")
    extractors: ClassVar[tuple[str, ...]] = ("answer",)  # names of the task's scores, first is the main one
    cot_instruction: ClassVar[str] = "Let's think step by step, then give the final answer as a number."

    # what every generative task takes (subclasses set their own max_tokens default)
    chat: bool = False
    max_tokens: int = 256
    seed: int = 0
    limit: int | None = None
    self_consistency: int | None = None  # K samples at sc_temperature, majority vote (reasoning mode)
    sc_temperature: float | None = None

    def prompt(self, item: Item, cot: bool) -> tuple[str | list, tuple[str, ...]]:
        raise NotImplementedError

    def extract(self, text: str) -> dict[str, str | None]:
        raise NotImplementedError

    def request(self, item: Item, cot: bool, temperature: float = 0.0, seed: int | None = None) -> GenerateRequest:
        prompt, stop = self.prompt(item, cot)
        max_tokens = getattr(self, "max_tokens", None) or 256
        if cot:
            max_tokens = max(max_tokens, getattr(self, "cot_max_tokens", 256))
        if isinstance(prompt, list):
            return GenerateRequest(messages=prompt, max_tokens=max_tokens, stop=stop, temperature=temperature,
                                   seed=seed)
        return GenerateRequest(prompt=prompt, max_tokens=max_tokens, stop=stop, temperature=temperature, seed=seed)

    def score(self, backend, items: list[Item], bar: Bar) -> list[dict]:
        k = self.self_consistency or 0
        temperature = self.sc_temperature
        temperature = 0.7 if temperature is None else temperature
        requests = [self.request(i, cot=False) for i in items]
        for n, item in enumerate(items):
            for j in range(k):
                requests.append(self.request(item, cot=True, temperature=temperature,
                                             seed=self.seed * 1_000_003 + n * 1009 + j))
        bar.start(len(requests))
        self._applied = {"greedy": _settings(requests[0]) if items else None,
                         "self_consistency": _settings(requests[len(items)]) if k and items else None}
        results = backend.generate(requests, bar.advance)
        greedy, samples = results[:len(items)], results[len(items):]
        records = []
        for n, (item, r) in enumerate(zip(items, greedy)):
            answers = self.extract(r.text)
            target = item.data["target"]
            record = {"id": item.id, "prompt_sha256": r.prompt_sha256, "output": r.text,
                      "answer": answers[self.extractors[0]], "answers": answers, "target": target,
                      "score": {name: float(answers[name] == target) for name in self.extractors},
                      "completion_tokens": r.completion_tokens, "prompt_tokens": r.prompt_tokens,
                      **{key: item.data[key] for key in item.data if key not in ("target",) and key in self.facets}}
            if k:
                mine = samples[n * k:(n + 1) * k]
                votes = [self.extract(s.text)[self.extractors[-1]] for s in mine]
                voted = majority(votes)
                record["self_consistency"] = {"outputs": [s.text for s in mine], "answers": votes, "majority": voted,
                                              "completion_tokens": sum(s.completion_tokens for s in mine),
                                              "prompt_sha256": sha256_text("".join(s.prompt_sha256 for s in mine))}
                record["score"]["self_consistency"] = float(voted == target)
            records.append(record)
        return records

    facets: ClassVar[tuple[str, ...]] = ()  # item fields copied to records and tabulated (length, depth ...)

    def aggregate(self, records: list[dict]) -> TaskResult:
        voted = bool(records) and "self_consistency" in records[0]["score"]
        names = list(self.extractors) + (["self_consistency"] if voted else [])
        metrics = {name: mean_score([r["score"][name] for r in records]) for name in names}
        compute = {"requests": len(records), "greedy_completion_tokens": sum(r["completion_tokens"] for r in records)}
        if "self_consistency" in names:
            k = len(records[0]["self_consistency"]["outputs"])
            compute.update(self_consistency_samples=k, sc_temperature=self.sc_temperature if self.sc_temperature is not None else 0.7,
                self_consistency_completion_tokens=sum(r["self_consistency"]["completion_tokens"] for r in records))
        compute["generation"] = getattr(self, "_applied", None)  # the settings sent with every request
        return TaskResult(records, metrics, self.tables(records), compute)

    def tables(self, records: list[dict]) -> dict:
        out = {}
        for facet in self.facets:
            groups: dict = {}
            for r in records:
                groups.setdefault(r[facet], []).append(r["score"][self.extractors[0]])
            rows = {str(k): mean_score(v) for k, v in sorted(groups.items())}
            out[f"accuracy by {facet}"] = {"facet": facet, "rows": rows,
                                           "text": "\n".join(f"  {facet} {k:>8}: {s['value']:.3f} (n={s['n']})"
                                                             for k, s in rows.items())}
        return out
