"""Multiple choice by log-likelihood, as lm-evaluation-harness scores it.

Each choice is the continuation `separator + choice` of the context, the separator a space unless the
context already ends in whitespace. lm-eval's pair encoding then applies: trailing whitespace of the
context moves to the start of the continuation, the context is tokenized alone (with the model's default
BOS), context + continuation is tokenized whole, and the continuation is whatever follows the context's
tokens. An empty context is read after the prefix token (BOS, else EOS).

acc: the choice with the highest log-likelihood is the label (first on ties, like numpy's argmax).
acc_norm: the same after dividing each log-likelihood by its choice's length in UTF-8 bytes (lm-eval
divides by len() of the choice string: characters, the same for ASCII).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from herd.eval.data import DataError, read_jsonl, sha256_json
from herd.eval.metrics import mean_score
from herd.eval.tasks.base import Bar, Item, Task, TaskResult, require_file


def continuation_for(context: str, choice: str) -> str:
    return choice if context[-1:].isspace() else " " + choice


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

    exact_fields: ClassVar[tuple[str, ...]] = ("prompt_sha256", "target")
    close_fields: ClassVar[tuple[str, ...]] = ("output",)

    def score(self, backend, items: list[Item], bar: Bar) -> list[dict]:
        pairs, owners = [], []
        for item in items:
            context = item.data["context"]
            for choice in item.data["choices"]:
                pairs.append(encode_pair(backend, context, continuation_for(context, choice)))
                owners.append(item.id)
        bar.start(len(pairs))
        results = backend.loglikelihoods(pairs, bar.advance)
        records, k = [], 0
        for item in items:
            n = len(item.data["choices"])
            lls = [r.logprob for r in results[k:k + n]]
            greedy = [r.greedy for r in results[k:k + n]]
            prompts = [p[0] + p[1] for p in pairs[k:k + n]]
            k += n
            lengths = [len(c.encode("utf-8")) for c in item.data["choices"]]
            pred = argmax(lls)
            pred_norm = argmax([ll / max(b, 1) for ll, b in zip(lls, lengths)])
            label = item.data["label"]
            records.append({"id": item.id, "prompt_sha256": sha256_json(prompts), "output": lls,
                            "greedy": greedy, "answer": pred, "answer_norm": pred_norm, "target": label,
                            "score": {"acc": float(pred == label), "acc_norm": float(pred_norm == label)}})
        return records

    def aggregate(self, records: list[dict]) -> TaskResult:
        metrics = {m: mean_score([r["score"][m] for r in records]) for m in ("acc", "acc_norm")}
        return TaskResult(records, metrics, compute={"requests": sum(len(r["output"]) for r in records)})


@dataclass
class MultipleChoice(ChoiceScoring, Task):
    """User data: JSONL lines {"context": str, "choices": [str, ...], "label": int}."""

    name: ClassVar[str] = "mc"
    kind: ClassVar[str] = "multiple-choice"
    data_fields: ClassVar[tuple[str, ...]] = ("data",)

    data: str | None = None
    limit: int | None = None

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
