"""Long-context retrieval: needles in generated haystacks, at chosen lengths (tokens of this model) and
depths (0 = the start of the haystack, 1 = its end).

A haystack is the filler text (the built-in Shakespeare excerpt, or `filler`), repeated and cut to the
length; each needle is a sentence "The secret number of <name> is <NN>." put at a sentence boundary
near its depth (with several needles, the others at seeded random depths). The question asks for one
needle's number and the model completes "The secret number of <name> is"; the first number in the
completion must be the needle's. Numbers are 10..99, so a guesser scores 1/90.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import ClassVar

from herd.errors import ContextOverflow
from herd.eval.data import read_text
from herd.eval.tasks.base import BUILTIN, Item
from herd.eval.tasks.generative import GenerativeTask, final_answer, first_number

NAMES = ["Amber", "Basil", "Cedar", "Delta", "Ember", "Fable", "Garnet", "Harbor", "Indigo", "Juniper", "Kestrel",
         "Lumen", "Marlow", "Nimbus", "Onyx", "Pepper", "Quartz", "Raven", "Saffron", "Thistle"]


def needle(name: str, value: int) -> str:
    return f"The secret number of {name} is {value}."


def insert_at(text: str, sentence: str, depth: float) -> str:
    """Put `sentence` at the sentence boundary nearest to `depth` of the text."""
    at = int(len(text) * depth)
    if 0 < at < len(text):
        ends = [i + 1 for i, c in enumerate(text) if c in ".!?\n"] or [i for i, c in enumerate(text) if c.isspace()]
        at = min(ends, key=lambda i: abs(i - at)) if ends else at
    return text[:at].rstrip() + (" " if at else "") + sentence + " " + text[at:].lstrip()


@dataclass
class Retrieval(GenerativeTask):
    name: ClassVar[str] = "retrieval"
    data_fields: ClassVar[tuple[str, ...]] = ("filler",)
    version: ClassVar[int] = 2  # 2: chain-of-thought samples read the final answer, not the first number
    facets: ClassVar[tuple[str, ...]] = ("length", "depth")

    lengths: list = field(default_factory=lambda: [256, 512, 1024])
    depths: list = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    needles: int = 1
    repeats: int = 2  # haystacks per (length, depth)
    filler: str | None = None
    max_tokens: int = 8

    def items(self, backend=None) -> list[Item]:
        if backend is None:
            raise TypeError("retrieval haystacks are measured in the model's tokens: items() needs the backend")
        text = read_text(self.filler) if self.filler else read_text(BUILTIN / "shakespeare-20k.txt")
        filler_ids = backend.encode(text, bos=False)
        rng = random.Random(f"retrieval:{self.seed}")
        items = []
        for length in self.lengths:
            if backend.context and length > backend.context - self.max_tokens:
                raise ContextOverflow(f"retrieval length {length} and {self.max_tokens} answer tokens exceed the "
                                      f"model's context of {backend.context}")
            for depth in self.depths:
                for r in range(self.repeats):
                    names = rng.sample(NAMES, self.needles)
                    values = [rng.randint(10, 99) for _ in names]
                    where = [depth] + [rng.random() for _ in names[1:]]
                    item = None
                    budget = length
                    for _ in range(8):  # cut the filler until the whole prompt fits in `length` tokens
                        h = backend.decode((filler_ids * (budget // max(len(filler_ids), 1) + 1))[:max(budget, 0)])
                        for n, v, d in list(zip(names, values, where))[::-1]:  # the asked one last: its depth holds
                            h = insert_at(h, needle(n, v), d)
                        item = Item(f"len{length}-depth{depth}-{r}", {
                            "haystack": h, "name": names[0], "target": str(values[0]), "length": length,
                            "depth": depth})
                        prompt, _ = self.prompt(item, cot=False)
                        n_tokens = len(backend.encode(prompt)) if isinstance(prompt, str) else length
                        if n_tokens <= length:
                            break
                        budget -= n_tokens - length
                    items.append(item)
        return items[:self.limit] if self.limit is not None else items

    def prompt(self, item: Item, cot: bool):
        d = item.data
        question = f"Question: What is the secret number of {d['name']}?"
        if cot:
            return (f"{d['haystack']}\n\n{question} {self.cot_instruction}\nAnswer:", ("\n\n",))
        lead = f"Answer: The secret number of {d['name']} is"
        if self.chat:
            return [{"role": "user", "content": f"{d['haystack']}\n\n{question}"}], ()
        return f"{d['haystack']}\n\n{question}\n{lead}", ("\n",)

    cot_max_tokens: ClassVar[int] = 128

    def extract(self, text: str) -> dict[str, str | None]:
        return {"answer": first_number(text)}  # the completion of "The answer is"

    def extract_cot(self, text: str) -> str | None:
        return final_answer(text)

    def tables(self, records: list[dict]) -> dict:
        out = super().tables(records)
        grid: dict = {}
        for r in records:
            grid.setdefault((r["length"], r["depth"]), []).append(r["score"]["answer"])
        lengths = sorted({k[0] for k in grid})
        depths = sorted({k[1] for k in grid})
        cells = [[sum(grid.get((L, D), [0])) / max(len(grid.get((L, D), [])), 1) for D in depths] for L in lengths]
        text = "  length \\ depth " + " ".join(f"{D:>6}" for D in depths) + "\n" + "\n".join(
            f"  {L:>15} " + " ".join(f"{c:>6.2f}" for c in row) for L, row in zip(lengths, cells))
        out["accuracy by length and depth"] = {"lengths": lengths, "depths": depths, "cells": cells, "text": text,
                                               "plot": "heatmap"}
        return out
