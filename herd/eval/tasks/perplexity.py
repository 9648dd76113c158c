"""Perplexity over a UTF-8 text, the way lm-evaluation-harness scores its perplexity tasks
(`loglikelihood_rolling`, e.g. wikitext): the text is tokenized whole without BOS and cut into disjoint
windows of `context` tokens read by the model; the first window is read after the prefix token (BOS, else
EOS) and every later one after the last token of the window before (lm-eval's
get_rolling_token_windows with context_len 1; its last, shorter window reads back to a full window), so
each token is predicted exactly once.

word_perplexity = exp(-LL / words) with lm-eval's word count (len(re.split(r"\\s+", text))),
byte_perplexity = exp(-LL / UTF-8 bytes), bits_per_byte = -LL / bytes / ln 2. Windows are the items; the
standard errors treat them as the sampling units (see herd.eval.metrics).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from herd.errors import ContextOverflow
from herd.eval.data import read_text, sha256_json
from herd.eval.metrics import perplexity_scores
from herd.eval.tasks.base import BUILTIN, Bar, Item, Task, TaskResult


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


def rolling_windows(tokens: list[int], prefix: int, context: int) -> list[tuple[list[int], list[int]]]:
    """(context ids, predicted ids) per window, as lm-eval's get_rolling_token_windows(context_len=1) followed
    by make_disjoint_window: the first window reads the prefix token and predicts `context` tokens; each
    full window after it reads one token before its own; the last, shorter one reads as many earlier
    tokens as make it `context` long. The model reads `context` tokens per window."""
    if not tokens:
        return []
    first = min(context, len(tokens))
    windows, predicted = [([prefix], tokens[:first])], first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, context)
        end = predicted + n
        windows.append((tokens[max(end - context - 1, 0):end - n], tokens[end - n:end]))
        predicted = end
    return windows


@dataclass
class Perplexity(Task):
    name: ClassVar[str] = "perplexity"
    kind: ClassVar[str] = "perplexity"
    data_fields: ClassVar[tuple[str, ...]] = ("data",)
    exact_fields: ClassVar[tuple[str, ...]] = ("prompt_sha256", "tokens")
    close_fields: ClassVar[tuple[str, ...]] = ("output",)

    data: str | None = None  # UTF-8 text file; None: the built-in Shakespeare excerpt
    context: int | None = None  # tokens the model reads per window; None: the model's context less one
    limit: int | None = None  # score only the first N windows

    def __post_init__(self):
        if self.data is None:
            self.data = str(BUILTIN / "shakespeare-20k.txt")

    def text(self) -> str:
        return read_text(self.data)

    def windows(self, backend) -> list[tuple[list[int], list[int]]]:
        # herd's engine feeds the last predicted token too (its key is written), so a window of N tokens
        # needs N + 1 positions: the model's context less one is the longest window
        most = backend.context - 1 if backend.context else None
        context = self.context or most
        if context is None:
            raise ContextOverflow("the server does not say its context: give --context N")
        if most is not None and context > most:
            raise ContextOverflow(f"--context {context} exceeds the longest window this model can score "
                                  f"({most} tokens: its context of {backend.context} less one)")
        if backend.prefix_token_id is None:
            raise ContextOverflow("the tokenizer has neither BOS nor EOS to read the first window after")
        self.context = context
        return rolling_windows(backend.encode(self.text(), bos=False), backend.prefix_token_id, context)

    def items(self, backend=None) -> list[Item]:
        raise TypeError("perplexity items depend on the tokenizer: use run()")

    def run(self, backend, bar: Bar | None = None, only: set[str] | None = None) -> TaskResult:
        bar = bar or Bar()
        windows = self.windows(backend)
        n_windows = len(windows)
        if self.limit is not None:
            windows = windows[:self.limit]
        ids = [f"window-{i}" for i in range(len(windows))]
        chosen = [(i, w) for i, w in zip(ids, windows) if only is None or i in only]
        bar.start(len(chosen))
        results = backend.loglikelihoods([w for _, w in chosen], bar.advance, greedy=False)
        records = []
        for (item_id, (ctx, predicted)), r in zip(chosen, results):
            records.append({"id": item_id, "prompt_sha256": sha256_json(ctx + predicted), "tokens": len(predicted),
                            "bytes": len(backend.decode(predicted).encode("utf-8")), "output": r.logprob,
                            "answer": None, "target": None, "score": {"loglik": r.logprob}})
        result = self.aggregate(records, whole=self.limit is None and only is None)
        result.compute["windows_in_text"] = n_windows
        return result

    def aggregate(self, records: list[dict], whole: bool | None = None) -> TaskResult:
        """`whole`: the records cover the whole text, whose exact byte and word counts are then used;
        otherwise bytes are the scored windows' own and words are prorated by bytes."""
        logliks = [r["output"] for r in records]
        tokens = [r["tokens"] for r in records]
        nbytes = [r["bytes"] for r in records]
        text = self.text()
        text_bytes, text_words = len(text.encode("utf-8")), count_words(text)
        if whole is None:
            whole = self.limit is None
        total_bytes = text_bytes if whole else sum(nbytes)
        total_words = text_words if whole else text_words * sum(nbytes) / text_bytes
        # the totals decide the values; the per-window split only weighs the windows for the standard error
        scale_b = total_bytes / max(sum(nbytes), 1)
        metrics = perplexity_scores(logliks, [b * scale_b * total_words / total_bytes for b in nbytes],
                                    [b * scale_b for b in nbytes], tokens)
        metrics["loglik"] = {"value": sum(logliks), "stderr": None, "n": len(records)}
        return TaskResult(records, metrics, compute={"requests": len(records), "tokens_scored": sum(tokens),
                                                     "bytes": total_bytes, "words": total_words})
