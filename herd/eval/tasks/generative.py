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

from herd.eval.backends import GenerateRequest, GenerateResult
from herd.eval.data import sha256_text
from herd.eval.metrics import mean_score
from herd.eval.tasks.base import Bar, Item, Task, TaskResult, recorded_output

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def first_number(text: str) -> str | None:
    m = NUMBER.search(text)
    return normalize_number(m.group(0)) if m else None


def last_number(text: str) -> str | None:
    found = NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


ANSWER_IS = re.compile(r"answer is\W*?(-?\$?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)


def final_answer(text: str) -> str | None:
    """A chain of thought's answer as GSM8K's chain-of-thought extraction reads it: the number after the last
    "the answer is", else the last number (the steps' numbers come before it)."""
    stated = ANSWER_IS.findall(text)
    return normalize_number(stated[-1]) if stated else last_number(text)


def normalize_number(text: str) -> str:
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", text):
        text = text.split(".")[0]
    return text


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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

    def extract_cot(self, text: str) -> str | None:
        """The answer a chain of thought ends with (what self-consistency votes on)."""
        return self.extract(text)[self.extractors[-1]]

    def request(self, item: Item, cot: bool, temperature: float = 0.0, seed: int | None = None) -> GenerateRequest:
        prompt, stop = self.prompt(item, cot)
        max_tokens = getattr(self, "max_tokens", None) or 256
        if cot:
            max_tokens = max(max_tokens, getattr(self, "cot_max_tokens", 256))
        if isinstance(prompt, list):
            return GenerateRequest(messages=prompt, max_tokens=max_tokens, stop=stop, temperature=temperature,
                                   seed=seed)
        return GenerateRequest(prompt=prompt, max_tokens=max_tokens, stop=stop, temperature=temperature, seed=seed)

    def requests(self, items: list[Item]) -> list[GenerateRequest]:
        """Every item's greedy request, then K chain-of-thought samples per item (seeds fixed by the item's
        place in the task and the run's seed); remembers the settings they carry for the report."""
        k = self.self_consistency or 0
        temperature = 0.7 if self.sc_temperature is None else self.sc_temperature
        requests = [self.request(i, cot=False) for i in items]
        for n, item in enumerate(items):
            for j in range(k):
                requests.append(self.request(item, cot=True, temperature=temperature,
                                             seed=self.seed * 1_000_003 + n * 1009 + j))
        self._applied = {"greedy": _settings(requests[0]) if items else None,
                         "self_consistency": _settings(requests[len(items)]) if k and items else None}
        return requests

    def record(self, item: Item, greedy: GenerateResult, samples: list[GenerateResult]) -> dict:
        """An item's record from the model's completions: what every answer and score follows from."""
        answers = self.extract(greedy.text)
        target = item.data["target"]
        record = {"id": item.id, "prompt_sha256": greedy.prompt_sha256, "output": greedy.text,
                  "answer": answers[self.extractors[0]], "answers": answers, "target": target,
                  "score": {name: float(answers[name] == target) for name in self.extractors},
                  "completion_tokens": greedy.completion_tokens, "prompt_tokens": greedy.prompt_tokens,
                  **{key: item.data[key] for key in item.data if key not in ("target",) and key in self.facets}}
        if self.self_consistency:
            votes = [self.extract_cot(s.text) for s in samples]
            voted = majority(votes)
            record["self_consistency"] = {"outputs": [s.text for s in samples], "answers": votes, "majority": voted,
                                          "completion_tokens": sum(s.completion_tokens for s in samples),
                                          "prompt_sha256": sha256_text("".join(s.prompt_sha256 for s in samples))}
            record["score"]["self_consistency"] = float(voted == target)
        return record

    def score(self, backend, items: list[Item], bar: Bar, only: set[str] | None = None) -> list[dict]:
        k = self.self_consistency or 0
        requests = self.requests(items)
        chosen = [n for n, item in enumerate(items) if only is None or item.id in only]
        asked = [n for n in chosen] + [len(items) + n * k + j for n in chosen for j in range(k)]
        bar.start(len(asked))
        # a decode step batches whichever sequences run together, so a subset generates in other batches
        # than the whole run did (see DETERMINISM): `herd eval verify` runs every item when a sample differs
        results = dict(zip(asked, backend.generate([requests[i] for i in asked], bar.advance)))
        return [self.record(items[n], results[n], [results[len(items) + n * k + j] for j in range(k)])
                for n in chosen]

    output_fields: ClassVar[tuple[str, ...]] = ("output", "prompt_tokens", "completion_tokens", "self_consistency")

    def rebuild(self, backend, items: list[Item], recorded: dict[str, dict]) -> list[dict]:
        k = self.self_consistency or 0
        requests = self.requests(items)

        def completion(request: GenerateRequest, text, completion_tokens, prompt_tokens) -> GenerateResult:
            sha, tokens = backend.prompt_facts(request)
            return GenerateResult(text, sha, prompt_tokens if tokens is None else tokens, completion_tokens)

        records = []
        for n, item in enumerate(items):
            rec = recorded[item.id]
            text = recorded_output(rec, "output", str, item.id)
            counted = recorded_output(rec, "completion_tokens", is_count, item.id)
            prompt_tokens = recorded_output(rec, "prompt_tokens", is_count, item.id)
            samples = []
            if k:
                sc = recorded_output(rec, "self_consistency", dict, item.id)
                outputs = recorded_output(sc, "outputs", lambda v: isinstance(v, list) and len(v) == k and all(
                    isinstance(x, str) for x in v), item.id)
                total = recorded_output(sc, "completion_tokens", is_count, item.id)
                # the samples' token counts are recorded as their sum: the first sample carries it
                samples = [completion(requests[len(items) + n * k + j], t, total if j == 0 else 0, None)
                           for j, t in enumerate(outputs)]
            records.append(self.record(item, completion(requests[n], text, counted, prompt_tokens), samples))
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
        """Accuracy by each facet: greedy, and with self-consistency the majority vote beside it."""
        voted = bool(records) and "self_consistency" in records[0]["score"]
        out = {}
        for facet in self.facets:
            groups: dict = {}
            for r in records:
                groups.setdefault(r[facet], []).append(r)
            rows = {str(k): mean_score([r["score"][self.extractors[0]] for r in v]) for k, v in sorted(groups.items())}
            table = {"facet": facet, "rows": rows}
            if voted:
                table["voted_rows"] = {str(k): mean_score([r["score"]["self_consistency"] for r in v])
                                       for k, v in sorted(groups.items())}
                table["text"] = "\n".join(f"  {facet} {k:>8}: greedy {s['value']:.3f}  voted "
                                          f"{table['voted_rows'][k]['value']:.3f} (n={s['n']})" for k, s in rows.items())
            else:
                table["text"] = "\n".join(f"  {facet} {k:>8}: {s['value']:.3f} (n={s['n']})" for k, s in rows.items())
            out[f"accuracy by {facet}"] = table
        return out
