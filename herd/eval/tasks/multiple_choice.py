"""Multiple choice by log-likelihood, as lm-evaluation-harness (0.4) scores its `multiple_choice` tasks.

Each choice is the continuation `" " + choice` of the context: lm-eval's target delimiter, a space, put
before every choice whatever the context ends with. lm-eval's HF pair encoding then applies: trailing
whitespace of the context moves to the start of the continuation (a context ending in a space gives the
continuation "  choice", two spaces), the context is tokenized alone (with the model's default BOS),
context + continuation is tokenized whole, and the continuation is whatever follows the context's tokens.
An empty context is read after the prefix token (BOS, else EOS).

acc: the choice with the highest log-likelihood is the label (first on ties, like numpy's argmax).
acc_norm: the same after dividing each log-likelihood by its choice's length in characters (lm-eval's
len() of the choice string); acc_bytes: divided by its length in UTF-8 bytes (lm-eval's acc_bytes).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import ClassVar

from herd.eval.data import DataError, read_jsonl, sha256_json
from herd.eval.metrics import mean_score
from herd.eval.tasks.base import Bar, Item, Task, TaskResult, is_number, recorded_output, require_file

TARGET_DELIMITER = " "  # lm-eval's default target_delimiter
METRICS = ("acc", "acc_norm", "acc_bytes")


def continuation_for(context: str, choice: str) -> str:
    return TARGET_DELIMITER + choice


def encode_pair(backend, context: str, continuation: str) -> tuple[list[int], list[int]]:
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [backend.prefix_token_id], backend.encode(continuation, bos=False)
    whole = backend.encode(context + continuation)
    context_ids = backend.encode(context)
    return whole[:len(context_ids)], whole[len(context_ids):]


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


class ChoiceScoring:
    """Shared by every task whose items are {context, choices, label}."""

    version: ClassVar[int] = 2  # 2: lm-eval's delimiter after a whitespace-ending context; acc_norm by characters

    output_fields: ClassVar[tuple[str, ...]] = ("output", "greedy")

    def pairs(self, backend, item: Item) -> list[tuple[list[int], list[int]]]:
        context = item.data["context"]
        return [encode_pair(backend, context, continuation_for(context, c)) for c in item.data["choices"]]

    def record(self, item: Item, pairs: list, lls: list[float], greedy: list[bool]) -> dict:
        """An item's record from its choices' log-likelihoods: what every answer and score follows from."""
        choices = item.data["choices"]
        pred = argmax(lls)
        pred_norm = argmax([ll / len(c) for ll, c in zip(lls, choices)])
        pred_bytes = argmax([ll / len(c.encode("utf-8")) for ll, c in zip(lls, choices)])
        label = item.data["label"]
        return {"id": item.id, "prompt_sha256": sha256_json([c + x for c, x in pairs]), "output": lls,
                "greedy": greedy, "answer": pred, "answer_norm": pred_norm, "answer_bytes": pred_bytes,
                "target": label, "score": {"acc": float(pred == label), "acc_norm": float(pred_norm == label),
                                           "acc_bytes": float(pred_bytes == label)}}

    def score(self, backend, items: list[Item], bar: Bar, only: set[str] | None = None) -> list[dict]:
        # every item's pairs go to the backend, so that `only` computes its items in the same forwards
        pairs, spans = [], []
        for item in items:
            mine = self.pairs(backend, item)
            spans.append((len(pairs), len(pairs) + len(mine)))
            pairs += mine
        wanted = None if only is None else {k for item, (a, b) in zip(items, spans) if item.id in only
                                            for k in range(a, b)}
        bar.start(len(pairs) if wanted is None else len(wanted))
        results = backend.loglikelihoods(pairs, bar.advance, wanted=wanted)
        records = []
        for item, (a, b) in zip(items, spans):
            if only is None or item.id in only:
                records.append(self.record(item, pairs[a:b], [r.logprob for r in results[a:b]],
                                           [r.greedy for r in results[a:b]]))
        return records

    def rebuild(self, backend, items: list[Item], recorded: dict[str, dict]) -> list[dict]:
        records = []
        for item in items:
            n = len(item.data["choices"])
            rec = recorded[item.id]
            lls = recorded_output(rec, "output", lambda v: isinstance(v, list) and len(v) == n and all(
                is_number(x) and math.isfinite(x) for x in v), item.id)
            greedy = recorded_output(rec, "greedy", lambda v: isinstance(v, list) and len(v) == n and all(
                isinstance(x, bool) for x in v), item.id)
            records.append(self.record(item, self.pairs(backend, item), lls, greedy))
        return records

    def aggregate(self, records: list[dict]) -> TaskResult:
        metrics = {m: mean_score([r["score"][m] for r in records]) for m in METRICS}
        return TaskResult(records, metrics, compute={"requests": sum(len(r["output"]) for r in records)})


@dataclass
class MultipleChoice(ChoiceScoring, Task):
    """User data: JSONL lines {"context": str, "choices": [str, ...], "label": int}."""

    name: ClassVar[str] = "mc"
    kind: ClassVar[str] = "multiple-choice"
    data_fields: ClassVar[tuple[str, ...]] = ("data",)

    data: str | None = None
    limit: int | None = None

    def check(self) -> None:
        require_file(self.data, self.name)

    def items(self, backend=None) -> list[Item]:
        path = require_file(self.data, self.name)
        rows = read_jsonl(path, {"context": str, "choices": list, "label": int})
        items = []
        for row in rows:
            n = row["_line"]
            choices = row["choices"]
            if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
                raise DataError(f"{path}:{n}: field 'choices' must hold at least two non-empty strings")
            if not 0 <= row["label"] < len(choices):
                raise DataError(f"{path}:{n}: field 'label' is {row['label']}, not an index into its "
                                f"{len(choices)} choices")
            items.append(Item(f"line-{n}", {"context": row["context"], "choices": choices, "label": row["label"]}))
        return items[:self.limit] if self.limit is not None else items


@dataclass
class ArithmeticChoice(ChoiceScoring, Task):
    """Built-in: sums of two numbers with four answers, generated from the seed."""

    name: ClassVar[str] = "mc-arithmetic"
    kind: ClassVar[str] = "multiple-choice"

    seed: int = 0
    limit: int | None = None
    digits: int = 2

    def items(self, backend=None) -> list[Item]:
        rng = random.Random(f"mc-arithmetic:{self.seed}:{self.digits}")
        lo, hi = 10 ** (self.digits - 1), 10 ** self.digits - 1
        items = []
        for i in range(self.limit if self.limit is not None else 100):
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            right = a + b
            wrong = set()
            while len(wrong) < 3:
                w = right + rng.choice([-1, 1]) * rng.randint(1, 10)
                if w != right and w > 0:
                    wrong.add(w)
            choices = [str(x) for x in sorted(wrong)]
            label = rng.randrange(4)
            choices.insert(label, str(right))
            items.append(Item(f"sum-{i}", {"context": f"Question: What is {a} + {b}?\nAnswer:", "choices": choices,
                                           "label": label}))
        return items
