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

import math
import re
from dataclasses import dataclass
from typing import ClassVar

from herd.errors import ContextOverflow
from herd.eval.data import DataError, read_text, read_text_prefix, sha256_json
from herd.eval.metrics import perplexity_scores
from herd.eval.tasks.base import BUILTIN, Bar, Item, Task, TaskResult, is_number, recorded_output

PREFIX_MARGIN = 64  # tokens dropped from the end of a prefix's tokenization, where a longer text may cut otherwise


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

    data: str | None = None  # UTF-8 text file; None: the built-in Shakespeare excerpt
    context: int | None = None  # tokens the model reads per window; None: the model's context less one
    limit: int | None = None  # score only the first N windows

    def __post_init__(self):
        if self.data is None:
            self.data = str(BUILTIN / "shakespeare-20k.txt")

    def text(self) -> str:
        return read_text(self.data)

    def windows(self, backend) -> list[tuple[list[int], list[int]]]:
        """The windows scored: every window of the text, or with `limit` the first `limit` of them, read
        from only as much of the file as they need. Sets what the metrics divide by: the bytes and words of
        the whole text when every window is scored, else of the scored windows' own text."""
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
        if self.limit is None:
            text = self.text()
            tokens = backend.encode(text, bos=False)
        else:
            text, tokens = self._leading_tokens(backend, self.limit * context)
        if not tokens:
            raise DataError(f"perplexity: text file {self.data} holds no text")
        windows = rolling_windows(tokens, backend.prefix_token_id, context)
        self.windows_in_text = len(windows) if text is not None else None
        if text is not None and (self.limit is None or self.limit >= len(windows)):
            self.totals = len(text.encode("utf-8")), count_words(text)
        else:
            windows = windows[:self.limit]
            scored = backend.decode([t for _, predicted in windows for t in predicted])
            self.totals = len(scored.encode("utf-8")), count_words(scored)
        return windows

    def _leading_tokens(self, backend, needed: int) -> tuple[str | None, list[int]]:
        """(the whole text or None, tokens): the first `needed` tokens of the text's tokenization, from a
        prefix of the file that grows until it holds them (a tokenizer's pieces never reach far across a
        line break, so the prefix's tokens up to a margin before its last line are the whole text's)."""
        size = max(needed * 8, 1 << 16)
        while True:
            text, complete = read_text_prefix(self.data, size)
            if complete:
                return text, backend.encode(text, bos=False)
            cut = text.rfind("\n", 0, len(text) - 1)
            tokens = backend.encode(text[:cut + 1] if cut > 0 else text, bos=False)[:-PREFIX_MARGIN]
            if len(tokens) >= needed:
                return None, tokens[:needed]
            size *= 4

    def items(self, backend=None) -> list[Item]:
        raise TypeError("perplexity items depend on the tokenizer: use run()")

    def record(self, backend, item_id: str, window: tuple[list[int], list[int]], loglik: float) -> dict:
        ctx, predicted = window
        return {"id": item_id, "prompt_sha256": sha256_json(ctx + predicted), "tokens": len(predicted),
                "bytes": len(backend.decode(predicted).encode("utf-8")), "output": loglik,
                "answer": None, "target": None, "score": {"loglik": loglik}}

    def run(self, backend, bar: Bar | None = None, only: set[str] | None = None) -> TaskResult:
        bar = bar or Bar()
        windows = self.windows(backend)
        ids = [f"window-{i}" for i in range(len(windows))]
        wanted = None if only is None else {k for k, i in enumerate(ids) if i in only}
        bar.start(len(windows) if wanted is None else len(wanted))
        # every window goes to the backend, so that `only` computes its windows in the same forwards
        results = backend.loglikelihoods(windows, bar.advance, greedy=False, wanted=wanted)
        return self.aggregate([self.record(backend, i, w, r.logprob)
                               for i, w, r in zip(ids, windows, results) if r is not None])

    def rebuild(self, backend, items, recorded: dict[str, dict]) -> list[dict]:
        windows = self.windows(backend)
        records = []
        for k, w in enumerate(windows):
            item_id = f"window-{k}"
            if item_id in recorded:
                loglik = recorded_output(recorded[item_id], "output", lambda v: is_number(v) and math.isfinite(v),
                                         item_id)
                records.append(self.record(backend, item_id, w, loglik))
        return records

    def item_ids(self, backend) -> list[str]:
        return [f"window-{k}" for k in range(len(self.windows(backend)))]

    def aggregate(self, records: list[dict]) -> TaskResult:
        """Over the windows `windows()` chose: their log-likelihoods against the bytes and words it counted;
        the per-window split of those only weighs the windows for the standard error."""
        logliks = [r["output"] for r in records]
        tokens = [r["tokens"] for r in records]
        nbytes = [r["bytes"] for r in records]
        total_bytes, total_words = self.totals
        scale_b = total_bytes / max(sum(nbytes), 1)
        metrics = perplexity_scores(logliks, [b * scale_b * total_words / total_bytes for b in nbytes],
                                    [b * scale_b for b in nbytes], tokens)
        metrics["loglik"] = {"value": sum(logliks), "stderr": None, "n": len(records)}
        return TaskResult(records, metrics, compute={"requests": len(records), "tokens_scored": sum(tokens),
                                                     "bytes": total_bytes, "words": total_words,
                                                     "windows_in_text": self.windows_in_text})
