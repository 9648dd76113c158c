"""Aggregate scores and their standard errors.

Means of per-item scores carry the standard error of the mean with the sample standard deviation
(n - 1), as lm-evaluation-harness reports `acc_stderr`. Perplexities are ratios of sums (log-likelihood
over words, bytes or tokens); their standard error is the delta-method (ratio-estimator) one over the
scoring units (windows), carried through exp() for the perplexities.
"""

from __future__ import annotations

import math
from typing import Sequence


def score(value: float, stderr: float | None, n: int) -> dict:
    return {"value": value, "stderr": stderr, "n": n}


def mean_score(values: Sequence[float]) -> dict:
    n = len(values)
    if n == 0:
        return score(float("nan"), None, 0)
    mean = math.fsum(values) / n
    if n < 2:
        return score(mean, None, n)
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return score(mean, math.sqrt(var / n), n)


def ratio_stderr(numerators: Sequence[float], denominators: Sequence[float]) -> float | None:
    """Standard error of R = sum(a) / sum(b) over n units (first-order delta method)."""
    n = len(numerators)
    total_b = math.fsum(denominators)
    if n < 2 or total_b == 0:
        return None
    r = math.fsum(numerators) / total_b
    resid = math.fsum((a - r * b) ** 2 for a, b in zip(numerators, denominators)) / (n - 1)
    return math.sqrt(resid / n) / (total_b / n)


def perplexity_scores(logliks: Sequence[float], words: Sequence[int], nbytes: Sequence[int],
                      tokens: Sequence[int]) -> dict:
    """word_perplexity, byte_perplexity, bits_per_byte and token_perplexity over units (windows)."""
    n = len(logliks)
    nll = [-x for x in logliks]
    total = math.fsum(nll)
    out = {}
    for name, counts in (("word_perplexity", words), ("byte_perplexity", nbytes), ("token_perplexity", tokens)):
        per = total / sum(counts)
        se = ratio_stderr(nll, counts)
        out[name] = score(math.exp(per), None if se is None else math.exp(per) * se, n)
    per_byte = total / sum(nbytes)
    se = ratio_stderr(nll, nbytes)
    out["bits_per_byte"] = score(per_byte / math.log(2), None if se is None else se / math.log(2), n)
    return out
