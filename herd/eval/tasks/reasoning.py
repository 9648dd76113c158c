"""Multi-step reasoning of chosen depth, generated from the seed: the answer is certain and the number
of steps to it is exact.

Three families, in turn:
- chain: "a = 7. b = a + 5. c = b - 3. ..." with `depth` operations; the value of the last variable;
- tracking: variables assigned, copied and reassigned; one variable's value after `depth` updates;
- lookup: a table of number -> number; follow it `depth` times from a start.
Every value lies in 10..99, so a guesser scores 1/90. The model completes "The answer is".
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import ClassVar

from herd.eval.data import DataError
from herd.eval.tasks.base import Item
from herd.eval.tasks.generative import GenerativeTask, final_answer, first_number

VARS = "abcdefghijklmnopqrstuvwxyz"


def chain(rng: random.Random, depth: int) -> tuple[str, str]:
    value = rng.randint(10, 99)
    lines = [f"a = {value}."]
    for i in range(1, depth + 1):
        k = rng.randint(1, 9)
        op = "+" if value + k <= 99 and (value - k < 10 or rng.random() < 0.5) else "-"
        value = value + k if op == "+" else value - k
        lines.append(f"{VARS[i]} = {VARS[i - 1]} {op} {k}.")
    return " ".join(lines) + f"\nQuestion: What is the value of {VARS[depth]}?", str(value)


def tracking(rng: random.Random, depth: int) -> tuple[str, str]:
    names = list("xyzw")
    values = {n: rng.randint(10, 99) for n in names}
    lines = [f"{n} = {v}." for n, v in values.items()]
    target = rng.choice(names)
    for _ in range(depth):
        dst = target if rng.random() < 0.6 else rng.choice(names)
        if rng.random() < 0.5:
            src = rng.choice([n for n in names if n != dst])
            values[dst] = values[src]
            lines.append(f"{dst} = {src}.")
        else:
            values[dst] = rng.randint(10, 99)
            lines.append(f"{dst} = {values[dst]}.")
    return " ".join(lines) + f"\nQuestion: What is the value of {target} now?", str(values[target])


def lookup(rng: random.Random, depth: int) -> tuple[str, str]:
    keys = rng.sample(range(10, 100), max(depth + 4, 8))
    targets = keys[:]
    while any(a == b for a, b in zip(keys, targets)):  # no entry points to itself: every step moves
        rng.shuffle(targets)
    table = dict(zip(keys, targets))
    start = rng.choice(keys)
    value = start
    for _ in range(depth):
        value = table[value]
    rows = " ".join(f"{k} -> {table[k]}." for k in sorted(table))
    return (f"Table: {rows}\nStart at {start} and follow the table {depth} time{'s' if depth > 1 else ''}.\n"
            "Question: Where do you end?", str(value))


FAMILIES = {"chain": chain, "tracking": tracking, "lookup": lookup}


@dataclass
class Reasoning(GenerativeTask):
    name: ClassVar[str] = "reasoning"
    version: ClassVar[int] = 2  # 2: chain-of-thought samples read the final answer, not the first number
    facets: ClassVar[tuple[str, ...]] = ("depth", "family")

    steps: list = field(default_factory=lambda: [1, 2, 4, 8])
    per_depth: int = 12  # problems per depth, spread over the families
    families: list = field(default_factory=lambda: ["chain", "tracking", "lookup"])
    max_tokens: int = 8

    def items(self, backend=None) -> list[Item]:
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise DataError(f"reasoning: unknown famil{'ies' if len(unknown) > 1 else 'y'} {unknown} "
                            f"(known: {', '.join(FAMILIES)})")
        rng = random.Random(f"reasoning:{self.seed}")
        items = []
        for depth in self.steps:
            for i in range(self.per_depth):
                family = self.families[i % len(self.families)]
                problem, answer = FAMILIES[family](rng, depth)
                items.append(Item(f"depth{depth}-{i}", {"problem": problem, "target": answer, "depth": depth,
                                                         "family": family}))
        return items[:self.limit] if self.limit is not None else items

    cot_max_tokens: ClassVar[int] = 192

    def prompt(self, item: Item, cot: bool):
        p = item.data["problem"]
        if cot:
            return f"{p} {self.cot_instruction}\nAnswer:", ("\n\n",)
        if self.chat:
            return [{"role": "user", "content": f"{p}\nReply with the number only."}], ()
        return f"{p}\nAnswer: The answer is", ("\n",)

    def extract(self, text: str) -> dict[str, str | None]:
        return {"answer": first_number(text)}  # the completion of "The answer is"

    def extract_cot(self, text: str) -> str | None:
        return final_answer(text)
