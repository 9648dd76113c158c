"""Bradley-Terry ratings of battle outcomes, as LMArena (FastChat's elo_analysis) computes them.

The model: P(a beats b) = 1 / (1 + BASE ** ((R_b - R_a) / SCALE)). It is fitted as a logistic regression
over battles with FastChat's conventions: every battle enters twice, a win as two wins, a tie (and "both
bad") as one win each way, so a tie counts half a win; the design column of a is +ln(BASE), of b -ln(BASE);
ratings are SCALE * coefficient + INIT, then shifted so the anchor contestant has the anchor rating.
`penalty_c` is sklearn's C (an L2 penalty of |theta|^2 / 2C): FastChat's LogisticRegression default of
1.0 keeps ratings finite while a contestant has only won (a tiny arena); None is the plain MLE.

Intervals: the 2.5% and 97.5% quantiles over bootstrap resamples of the battles (numpy's RandomState
choice of indices with replacement, the stream pandas' DataFrame.sample draws from, so a seeded run
repeats FastChat's resamples). Style control (LMArena's): the answers' length and markdown differences,
normalised by their sums and standardised, enter as extra columns fitted jointly with the ratings; their
coefficients say how much each style feature moves the vote.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SCALE, BASE, INIT_RATING = 400.0, 10.0, 1000.0
WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
# The style features of LMArena's style-controlled board, each taken as (a - b) / (a + b + 1).
STYLE_FEATURES = ("sum_assistant_tokens", "header_count", "list_count", "bold_count")


@dataclass(frozen=True)
class Outcome:
    """One voted battle: contestant keys, the vote, and (for style control) each answer's style counts."""

    model_a: str
    model_b: str
    winner: str  # one of WINNERS
    style_a: tuple[float, ...] | None = None  # STYLE_FEATURES of answer a
    style_b: tuple[float, ...] | None = None


@dataclass
class Rated:
    """One contestant's line of a board."""

    key: str
    rating: float
    lower: float  # 95% bootstrap interval
    upper: float
    rank_best: int  # 1 + contestants whose lower bound lies above this one's upper bound (LMArena's rank)
    rank_worst: int  # the rank if every overlapping interval fell the other way
    battles: int
    wins: int
    ties: int
    share: float  # this contestant's battles / all battles (each battle has two contestants: shares sum to 2)


@dataclass
class Board:
    rows: list[Rated]  # best first
    style_coefficients: dict[str, float] = field(default_factory=dict)  # style control only
    win_fraction: dict[str, dict[str, float | None]] = field(default_factory=dict)  # row beat column (no ties)
    battle_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # all battles between the pair
    n_battles: int = 0
    rounds: int = 0


def _check(outcomes: list[Outcome]) -> None:
    for i, o in enumerate(outcomes):
        if o.winner not in WINNERS:
            raise ValueError(f"battle {i}: winner must be one of {WINNERS}, got {o.winner!r}")
        if o.model_a == o.model_b:
            raise ValueError(f"battle {i}: a contestant cannot fight itself ({o.model_a!r})")


def _design(outcomes: list[Outcome], models: list[str], style: np.ndarray | None):
    """FastChat's rows, weighted instead of duplicated, identical rows merged: (X, y, weight of each row, the
    rows' index per battle). A decided battle is one row of weight 2; a tie a win and a loss of weight 1."""
    index = {m: i for i, m in enumerate(models)}
    n, p = len(outcomes), len(models)
    k = 0 if style is None else style.shape[1]
    a = np.array([index[o.model_a] for o in outcomes])
    b = np.array([index[o.model_b] for o in outcomes])
    tie = np.array([o.winner.startswith("tie") for o in outcomes], dtype=bool)
    a_won = np.array([o.winner == "model_a" for o in outcomes], dtype=bool)
    rows = np.zeros((n, p + k))
    rows[np.arange(n), a] = math.log(BASE)
    rows[np.arange(n), b] = -math.log(BASE)
    if style is not None:
        rows[:, p:] = style
    decided = np.flatnonzero(~tie)
    tied = np.flatnonzero(tie)
    battle = np.concatenate([decided, tied, tied])
    X = rows[battle]
    y = np.concatenate([a_won[decided].astype(float), np.ones(len(tied)), np.zeros(len(tied))])
    w = np.concatenate([np.full(len(decided), 2.0), np.ones(2 * len(tied))])
    unique, group = np.unique(np.column_stack([X, y]), axis=0, return_inverse=True)
    return unique[:, :-1], unique[:, -1], w, group.reshape(-1), battle


def _weights(w, group, battle, n_groups, counts=None) -> np.ndarray:
    """Each merged row's weight: its rows' weights, times how often a resample drew their battle."""
    return np.bincount(group, weights=w if counts is None else w * counts[battle], minlength=n_groups)


def _fit(X: np.ndarray, y: np.ndarray, w: np.ndarray, penalty_c: float | None) -> np.ndarray:
    from scipy.optimize import minimize
    from scipy.special import expit, log1p

    def loss_and_grad(theta):
        z = X @ theta
        # log(1 + e^z) - y z, stably
        loss = np.sum(w * (np.maximum(z, 0) + log1p(np.exp(-np.abs(z))) - y * z))
        grad = X.T @ (w * (expit(z) - y))
        if penalty_c is not None:
            loss, grad = penalty_c * loss + 0.5 * theta @ theta, penalty_c * grad + theta
        return loss, grad

    result = minimize(loss_and_grad, np.zeros(X.shape[1]), jac=True, method="L-BFGS-B",
                      options={"maxiter": 10_000, "gtol": 1e-11, "ftol": 1e-15})
    return result.x


def style_matrix(outcomes: list[Outcome]) -> np.ndarray:
    """LMArena's style columns: (a - b) / (a + b + 1) for each feature, standardised over the battles."""
    missing = [i for i, o in enumerate(outcomes) if o.style_a is None or o.style_b is None]
    if missing:
        raise ValueError(f"style control needs both answers' style counts; battle {missing[0]} has none")
    sa = np.array([o.style_a for o in outcomes], dtype=float)
    sb = np.array([o.style_b for o in outcomes], dtype=float)
    diff = (sa - sb) / (sa + sb + 1.0)
    std = diff.std(axis=0)
    return (diff - diff.mean(axis=0)) / np.where(std > 0, std, 1.0)


def _models(outcomes: list[Outcome]) -> list[str]:
    return list(dict.fromkeys(m for o in outcomes for m in (o.model_a, o.model_b)))


def _ratings(X, y, weights, models, anchor, penalty_c) -> tuple[np.ndarray, np.ndarray]:
    """(ratings, NaN for contestants without a battle in these weights; style coefficients)."""
    used = weights > 0
    X, y, weights = X[used], y[used], weights[used]
    p = len(models)
    theta = _fit(X, y, weights, penalty_c)
    ratings = SCALE * theta[:p] + INIT_RATING
    ratings[~(X[:, :p] != 0).any(axis=0)] = np.nan
    if anchor is not None and anchor[0] in models and not np.isnan(ratings[models.index(anchor[0])]):
        ratings += anchor[1] - ratings[models.index(anchor[0])]
    return ratings, theta[p:]


def fit_ratings(outcomes: list[Outcome], *, anchor: tuple[str, float] | None = None, style_control: bool = False,
                penalty_c: float | None = 1.0) -> tuple[dict[str, float], dict[str, float]]:
    """(rating per contestant key, style coefficients) from one fit on all the battles."""
    _check(outcomes)
    if not outcomes:
        return {}, {}
    models = _models(outcomes)
    style = style_matrix(outcomes) if style_control else None
    X, y, w, group, battle = _design(outcomes, models, style)
    ratings, coefs = _ratings(X, y, _weights(w, group, battle, len(X)), models, anchor, penalty_c)
    return dict(zip(models, ratings.tolist())), dict(zip(STYLE_FEATURES, coefs.tolist())) if style_control else {}


def bootstrap(outcomes: list[Outcome], rounds: int, seed: int, *, anchor=None, style_control: bool = False,
              penalty_c: float | None = 1.0) -> tuple[list[str], np.ndarray]:
    """(models, ratings[rounds, models]); NaN where a resample lacks the contestant."""
    _check(outcomes)
    models = _models(outcomes)
    style = style_matrix(outcomes) if style_control else None  # standardised once, on all battles
    X, y, w, group, battle = _design(outcomes, models, style)
    rng = np.random.RandomState(seed)
    out = np.empty((rounds, len(models)))
    n = len(outcomes)
    for r in range(rounds):
        counts = np.bincount(rng.choice(n, size=n, replace=True), minlength=n).astype(float)
        out[r], _ = _ratings(X, y, _weights(w, group, battle, len(X), counts), models, anchor, penalty_c)
    return models, out


def pair_tables(outcomes: list[Outcome], order: list[str]):
    """(win fraction of row over column among decided battles, battle counts of each pair incl. ties)."""
    wins = {a: {b: 0 for b in order} for a in order}
    decided = {a: {b: 0 for b in order} for a in order}
    counts = {a: {b: 0 for b in order} for a in order}
    for o in outcomes:
        counts[o.model_a][o.model_b] += 1
        counts[o.model_b][o.model_a] += 1
        if o.winner in ("model_a", "model_b"):
            winner, loser = (o.model_a, o.model_b) if o.winner == "model_a" else (o.model_b, o.model_a)
            wins[winner][loser] += 1
            decided[winner][loser] += 1
            decided[loser][winner] += 1
    fraction = {a: {b: (wins[a][b] / decided[a][b] if decided[a][b] else None) for b in order} for a in order}
    return fraction, counts


def rank_ranges(lower: dict[str, float], upper: dict[str, float]) -> dict[str, tuple[int, int]]:
    """(best, worst) rank of each contestant given the intervals: best = 1 + those surely above, worst =
    all - those surely below."""
    keys = list(lower)
    out = {}
    for k in keys:
        above = sum(1 for j in keys if j != k and lower[j] > upper[k])
        below = sum(1 for j in keys if j != k and upper[j] < lower[k])
        out[k] = (1 + above, len(keys) - below)
    return out


def board(outcomes: list[Outcome], *, rounds: int = 1000, seed: int = 0, anchor: tuple[str, float] | None = None,
          style_control: bool = False, penalty_c: float | None = 1.0) -> Board:
    """The whole leaderboard: ratings from all battles, intervals from the bootstrap, rank ranges, counts."""
    _check(outcomes)
    if not outcomes:
        return Board(rows=[], rounds=rounds)
    ratings, coefs = fit_ratings(outcomes, anchor=anchor, style_control=style_control, penalty_c=penalty_c)
    models, boot = bootstrap(outcomes, rounds, seed, anchor=anchor, style_control=style_control,
                             penalty_c=penalty_c)
    lower = dict(zip(models, np.nanquantile(boot, 0.025, axis=0).tolist()))
    upper = dict(zip(models, np.nanquantile(boot, 0.975, axis=0).tolist()))
    ranks = rank_ranges(lower, upper)
    order = sorted(models, key=lambda m: -ratings[m])
    fraction, counts = pair_tables(outcomes, order)
    n = len(outcomes)
    rows = []
    for m in order:
        mine = [o for o in outcomes if m in (o.model_a, o.model_b)]
        won = sum(1 for o in mine if (o.winner == "model_a" and o.model_a == m) or
                  (o.winner == "model_b" and o.model_b == m))
        tied = sum(1 for o in mine if o.winner.startswith("tie"))
        rows.append(Rated(m, ratings[m], lower[m], upper[m], ranks[m][0], ranks[m][1], len(mine), won, tied,
                          len(mine) / n))
    return Board(rows, coefs, fraction, counts, n, rounds)
