"""`herd eval contamination`: has the model, or its training corpus, seen a task's items?

- n-gram overlap, 13 words by default (the n-gram test of GPT-3 and lm-eval's decontamination): an item's text, lowercased
  and split into words with punctuation removed, against every n-gram of a corpus (a file or a directory,
  streamed line by line, so it may be larger than memory; only the items' n-grams are held). An item's
  overlap is the fraction of its n-grams found in the corpus.
- Min-K% Prob (Shi et al., 2024): the mean log-probability of the k% least likely tokens of the item's
  text under the model; Min-K%++ (Zhang et al., 2024): the same over each token's log-probability
  standardized by the mean and standard deviation of log p under the model's distribution at that
  position. Higher means more likely seen in training. Full distributions come from herd.LLM.logits.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

from herd.errors import ContextOverflow
from herd.eval.data import iter_corpus_lines

WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def item_text(task, item) -> str:
    d = item.data
    if "choices" in d:
        return d["context"] + " " + d["choices"][d["label"]]
    if "question" in d:
        return d["question"] + " " + d.get("solution", "")
    raise TypeError(f"task {task.name!r} generates its items; there is nothing to look for in a corpus")


def ngram_overlap(texts: dict[str, str], corpus, n: int = 13) -> dict[str, float | None]:
    """item id -> fraction of its word n-grams that occur in the corpus (None: fewer than n words, nothing
    to look for)."""
    wanted: dict[tuple, set[str]] = {}
    counts = {}
    for item_id, text in texts.items():
        w = words(text)
        grams = {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
        counts[item_id] = len(grams)
        for g in grams:
            wanted.setdefault(g, set()).add(item_id)
    found: dict[str, set] = {i: set() for i in texts}
    current, window = None, deque(maxlen=n)
    for file, line in iter_corpus_lines(corpus):
        if file != current:  # n-grams do not run across files
            current = file
            window.clear()
        for w in words(line):
            window.append(w)
            if len(window) == n:
                g = tuple(window)
                for item_id in wanted.get(g, ()):
                    found[item_id].add(g)
    # an item shorter than n words has no n-gram: its overlap cannot be measured, which is not 0
    return {i: (len(found[i]) / counts[i] if counts[i] else None) for i in texts}


def min_k(llm, text: str, k: float = 0.2) -> tuple[float, float]:
    """(Min-K% Prob, Min-K%++) of `text` under `llm`."""
    import torch

    ids = llm.tokenizer.encode(text)
    if len(ids) < 2:
        return float("nan"), float("nan")
    if len(ids) > llm.config.max_seq_len:
        raise ContextOverflow(f"an item of {len(ids)} tokens exceeds the model's context of {llm.config.max_seq_len}")
    logprobs = torch.log_softmax(llm.logits(ids).double(), dim=-1)[:-1]
    target = torch.tensor(ids[1:])
    token_lp = logprobs.gather(1, target[:, None])[:, 0]
    probs = logprobs.exp()
    mu = (probs * logprobs).sum(-1)
    sigma = ((probs * logprobs.square()).sum(-1) - mu.square()).clamp_min(1e-12).sqrt()
    standardized = (token_lp - mu) / sigma
    count = max(1, int(len(token_lp) * k))
    return (float(token_lp.sort().values[:count].mean()), float(standardized.sort().values[:count].mean()))


@dataclass
class Suspicion:
    id: str
    overlap: float | None  # None: no corpus given, or the item is shorter than the n-gram (see words)
    min_k: float
    min_k_pp: float
    tokens: int
    words: int = 0


def contamination(llm, task, corpus=None, n: int = 13, k: float = 0.2) -> list[Suspicion]:
    items = task.items()
    texts = {i.id: item_text(task, i) for i in items}
    overlap = ngram_overlap(texts, corpus, n) if corpus is not None else {}
    out = []
    for item_id, text in texts.items():
        a, b = min_k(llm, text, k) if llm is not None else (float("nan"), float("nan"))
        out.append(Suspicion(item_id, overlap.get(item_id), a, b,
                             len(llm.tokenizer.encode(text)) if llm is not None else 0, len(words(text))))
    out.sort(key=lambda s: (-(s.overlap or 0), -s.min_k_pp))
    return out


def table(rows: list[Suspicion], top: int = 20, n: int = 13, corpus: bool = True) -> str:
    """The `top` rows; an item shorter than the n-gram shows "too short" (not checked), not an overlap."""
    head = f"{n}-gram overlap"
    width = max(15, len(head))
    lines = [f"{'item':<16} {head:>{width}} {'Min-K%':>9} {'Min-K%++':>9} {'tokens':>7}"]
    for s in rows[:top]:
        if not corpus:
            ov = "-"
        elif s.overlap is None:
            ov = "too short"
        else:
            ov = f"{s.overlap:.3f}"
        lines.append(f"{s.id:<16} {ov:>{width}} {s.min_k:>9.3f} {s.min_k_pp:>9.3f} {s.tokens:>7}")
    short = sum(1 for s in rows if s.overlap is None)
    if corpus and short:
        lines.append(f"{short} item{'s' if short > 1 else ''} of fewer than {n} words: no {n}-gram to look for, "
                     "so their overlap was not checked (shown as 'too short', not 0)")
    return "\n".join(lines)
