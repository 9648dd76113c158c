"""GSM8K (grade-school maths, JSONL `question` / `answer`), as lm-evaluation-harness's `gsm8k` task.

Prompt: `shots` solved examples from the train split (drawn once with the seed) as
"Question: ...\\nAnswer: <worked answer>\\n\\n", then "Question: <q>\\nAnswer:"; with `chat` the shots are
turns of a conversation in the model's chat template (lm-eval's fewshot_as_multiturn). Greedy, stops at
"Question:", a blank line or an end-of-turn. Extraction:
- strict: the number after "#### " (lm-eval's `#### (\\-?[0-9\\.\\,]+)`);
- flexible: the last number in the output (lm-eval's `(-?[$0-9.,]{2,})|(-?[0-9]+)`, last match).
Both are normalized as lm-eval's exact_match is told to: commas and "$" removed, a final "." dropped.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from herd.eval.data import DataError, read_jsonl
from herd.eval.tasks.base import Item, require_file
from herd.eval.tasks.generative import GenerativeTask, normalize_number

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
STOPS = ("Question:", "\n\n", "</s>", "<|im_end|>")


def strict_answer(text: str) -> str | None:
    m = STRICT.search(text)
    return normalize_number(m.group(1)) if m else None


def flexible_answer(text: str) -> str | None:
    found = [a or b for a, b in FLEXIBLE.findall(text)]
    return normalize_number(found[-1]) if found else None


def target_of(answer: str) -> str:
    return normalize_number(answer.split("####")[-1])


@dataclass
class GSM8K(GenerativeTask):
    name: ClassVar[str] = "gsm8k"
    extractors: ClassVar[tuple[str, ...]] = ("strict_match", "flexible_match")
    data_fields: ClassVar[tuple[str, ...]] = ("data", "train")

    data: str | None = None  # the test split
    train: str | None = None  # where shots come from; default train.jsonl beside data
    shots: int = 8

    def __post_init__(self):
        if self.train is None and self.data is not None and self.shots:
            beside = Path(self.data).expanduser().with_name("train.jsonl")
            if beside.is_file():
                self.train = str(beside)

    def check(self) -> None:
        data = require_file(self.data, self.name)
        if self.shots and self.train is None:
            raise DataError(f"gsm8k: {self.shots} shots come from a train split: give --train PATH, or put "
                            f"train.jsonl beside the data ({data.with_name('train.jsonl')} is missing), or --shots 0")
        super().check()

    def shot_rows(self) -> list[dict]:
        if not self.shots:
            return []
        if self.train is None:
            raise DataError(f"gsm8k: {self.shots} shots need --train PATH (no train.jsonl beside the data)")
        rows = read_jsonl(require_file(self.train, self.name, "--train PATH"), {"question": str, "answer": str})
        if len(rows) < self.shots:
            raise DataError(f"gsm8k: {self.train} has {len(rows)} examples, fewer than {self.shots} shots")
        return random.Random(f"gsm8k-shots:{self.seed}").sample(rows, self.shots)

    def items(self, backend=None) -> list[Item]:
        rows = read_jsonl(require_file(self.data, self.name), {"question": str, "answer": str})
        rows = rows[:self.limit] if self.limit is not None else rows
        self._shots = self.shot_rows()
        return [Item(f"line-{r['_line']}", {"question": r["question"], "target": target_of(r["answer"]),
                                            "solution": r["answer"]}) for r in rows]

    def prompt(self, item: Item, cot: bool):
        q = item.data["question"]
        shots = getattr(self, "_shots", None)
        if shots is None:
            shots = self._shots = self.shot_rows()
        if self.chat:
            messages = []
            for s in shots:
                messages += [{"role": "user", "content": f"Question: {s['question']}\nAnswer:"},
                             {"role": "assistant", "content": s["answer"]}]
            ask = f"Question: {q}\nAnswer:" + (f" {self.cot_instruction}" if cot else "")
            return messages + [{"role": "user", "content": ask}], STOPS
        text = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
        return text + f"Question: {q}\nAnswer:" + (" Let's think step by step." if cot else ""), STOPS

    def extract(self, text: str) -> dict[str, str | None]:
        return {"strict_match": strict_answer(text), "flexible_match": flexible_answer(text)}
