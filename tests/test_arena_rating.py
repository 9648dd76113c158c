"""herd.arena.rating against FastChat's own elo_analysis (the `fschat` package, as LMArena published it).

fschat's module imports FastChat's model registry (and through it transformers' model classes); the three
FastChat modules it needs only for names are stubbed, and its own functions run unchanged. Ratings use
its compute_elo_mle_with_tie (sklearn's LogisticRegression on duplicated battles, ties as a win each way,
llama-13b anchored at 800), intervals its get_bootstrap_result (pandas resampling from numpy's global
RNG). Style control has no function in this fschat release: the reference is LMArena's published
construction (FastChat main's construct_style_matrices, rebuilt here with pandas) fitted with sklearn.
sklearn's tolerance is tightened so both sides are converged to the 1e-3 the comparison asks.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from herd.arena import rating
from herd.arena.rating import Outcome

sklearn_linear = pytest.importorskip("sklearn.linear_model")


def fschat_elo_analysis():
    spec = importlib.util.find_spec("fastchat")
    if spec is None:
        pytest.skip("fschat is not installed (pip install --no-deps fschat==0.2.36)")
    path = Path(list(spec.submodule_search_locations)[0]) / "serve" / "monitor" / "elo_analysis.py"
    stubs = {"fastchat.model.model_registry": dict(get_model_info=None),
             "fastchat.serve.monitor.basic_stats": dict(get_log_files=None),
             "fastchat.serve.monitor.clean_battle_data": dict(clean_battle_data=None)}
    saved = {name: sys.modules.get(name) for name in stubs}
    try:
        for name, attrs in stubs.items():
            sys.modules[name] = types.SimpleNamespace(**attrs)
        module_spec = importlib.util.spec_from_file_location("fschat_elo_analysis", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return module


@pytest.fixture(scope="module")
def fschat():
    return fschat_elo_analysis()


class TightLogisticRegression(sklearn_linear.LogisticRegression):
    """sklearn's estimator with FastChat's arguments, converged further (tol only)."""

    def __init__(self, fit_intercept=True, C=1.0):
        super().__init__(fit_intercept=fit_intercept, C=C, tol=1e-12, max_iter=100_000)


@pytest.fixture
def tight_sklearn(monkeypatch):
    monkeypatch.setattr(sklearn_linear, "LogisticRegression", TightLogisticRegression)


def random_battles(seed: int, n: int = 300) -> list[dict]:
    """Battles among five contestants of known strength, with ties, both-bad ties and style counts."""
    rng = np.random.default_rng(seed)
    models = ["llama-13b", "alpaca", "vicuna", "koala", "dolly"]
    strength = dict(zip(models, [0.0, 0.4, 1.0, -0.3, -0.8]))
    out = []
    for i in range(n):
        a, b = rng.choice(len(models), 2, replace=False)
        ma, mb = models[a], models[b]
        style = {f"{f}_{s}": int(rng.integers(0, 8 if f != "sum_assistant_tokens" else 400))
                 for f in rating.STYLE_FEATURES for s in "ab"}
        length_push = 0.002 * (style["sum_assistant_tokens_a"] - style["sum_assistant_tokens_b"])
        p = 1 / (1 + math.exp(-(strength[ma] - strength[mb] + length_push)))
        u = rng.random()
        winner = "tie" if u < 0.1 else "tie (bothbad)" if u < 0.15 else "model_a" if rng.random() < p else "model_b"
        out.append(dict(model_a=ma, model_b=mb, winner=winner, tstamp=float(i), **style))
    return out


def outcomes(battles, style=False):
    def counts(b, side):
        return tuple(b[f"{f}_{side}"] for f in rating.STYLE_FEATURES) if style else None

    return [Outcome(b["model_a"], b["model_b"], b["winner"], counts(b, "a"), counts(b, "b")) for b in battles]


def test_ratings_equal_fschat_compute_elo_mle_with_tie(fschat, tight_sklearn):
    battles = random_battles(0)
    expected = fschat.compute_elo_mle_with_tie(pd.DataFrame(battles))  # anchors llama-13b at 800
    ours, _ = rating.fit_ratings(outcomes(battles), anchor=("llama-13b", 800.0))
    assert set(ours) == set(expected.index)
    for m in ours:
        assert ours[m] == pytest.approx(expected[m], abs=1e-3), m
    assert ours["llama-13b"] == pytest.approx(800.0, abs=1e-9)
    assert any(b["winner"] == "tie (bothbad)" for b in battles) and any(b["winner"] == "tie" for b in battles)


def test_unpenalised_mle_equals_sklearn_without_penalty(fschat, monkeypatch):
    battles = random_battles(1)
    monkeypatch.setattr(sklearn_linear, "LogisticRegression",
                        lambda fit_intercept=False: TightLogisticRegression(fit_intercept, C=np.inf))
    expected = fschat.compute_elo_mle_with_tie(pd.DataFrame(battles))
    ours, _ = rating.fit_ratings(outcomes(battles), anchor=("llama-13b", 800.0), penalty_c=None)
    for m in ours:
        assert ours[m] == pytest.approx(expected[m], abs=1e-3), m


def test_intervals_equal_fschat_bootstrap(fschat, tight_sklearn):
    battles = random_battles(2, n=120)
    np.random.seed(7)
    boot = fschat.get_bootstrap_result(pd.DataFrame(battles), fschat.compute_elo_mle_with_tie, num_round=40)
    board = rating.board(outcomes(battles), rounds=40, seed=7, anchor=("llama-13b", 800.0))
    q025, q975 = boot.quantile(0.025), boot.quantile(0.975)
    final = fschat.compute_elo_mle_with_tie(pd.DataFrame(battles))
    ranking = {}  # fschat's report_elo_analysis_results rule
    for a in final.index:
        ranking[a] = 1 + sum(1 for b in final.index if b != a and q025[b] > q975[a])
    for row in board.rows:
        assert row.lower == pytest.approx(q025[row.key], abs=1e-3), row.key
        assert row.upper == pytest.approx(q975[row.key], abs=1e-3), row.key
        assert row.rating == pytest.approx(final[row.key], abs=1e-3), row.key
        assert row.rank_best == ranking[row.key]
        assert row.rank_best <= row.rank_worst
    assert [r.key for r in board.rows] == list(final.index)  # best first
    assert sum(r.battles for r in board.rows) == 2 * len(battles)


def lmarena_style_matrices(df: pd.DataFrame, base=10):
    """LMArena's construct_style_matrices (FastChat main, elo_analysis.py), with the counts as columns."""
    models = pd.concat([df["model_a"], df["model_b"]]).unique()
    models = pd.Series(np.arange(len(models)), index=models)
    df = pd.concat([df, df], ignore_index=True)
    p, n, k = len(models), df.shape[0], len(rating.STYLE_FEATURES)
    X = np.zeros([n, p + k])
    X[np.arange(n), models[df["model_a"]]] = +math.log(base)
    X[np.arange(n), models[df["model_b"]]] = -math.log(base)
    va = np.array([df[f"{f}_a"] for f in rating.STYLE_FEATURES], dtype=float)
    vb = np.array([df[f"{f}_b"] for f in rating.STYLE_FEATURES], dtype=float)
    diff = (va - vb) / (va + vb + 1)
    X[:, -k:] = ((diff - diff.mean(axis=1)[:, None]) / diff.std(axis=1)[:, None]).T
    Y = np.zeros(n)
    Y[df["winner"] == "model_a"] = 1.0
    tie = (df["winner"] == "tie") | (df["winner"] == "tie (bothbad)")
    tie[len(tie) // 2:] = False
    Y[tie] = 1.0
    return X, Y, models


def test_style_control_equals_sklearn_on_lmarenas_matrices():
    battles = random_battles(3)
    X, Y, models = lmarena_style_matrices(pd.DataFrame(battles))
    lr = TightLogisticRegression(fit_intercept=False).fit(X, Y)
    p = len(models)
    expected = 400 * lr.coef_[0][:p] + 1000
    expected += 800 - expected[models["llama-13b"]]
    ours, coefs = rating.fit_ratings(outcomes(battles, style=True), anchor=("llama-13b", 800.0), style_control=True)
    for m, i in models.items():
        assert ours[m] == pytest.approx(expected[i], abs=1e-3), m
    for f, c in zip(rating.STYLE_FEATURES, lr.coef_[0][p:]):
        assert coefs[f] == pytest.approx(c, abs=1e-5), f
    assert coefs["sum_assistant_tokens"] > 0  # the simulated voters liked length
    raw, _ = rating.fit_ratings(outcomes(battles), anchor=("llama-13b", 800.0))
    assert max(abs(raw[m] - ours[m]) for m in raw) > 1  # regressing length out moved the ratings


def test_style_controlled_intervals_resample_battles_like_lmarena():
    battles = random_battles(4, n=100)
    X, Y, models = lmarena_style_matrices(pd.DataFrame(battles))
    half = len(battles)
    rs = np.random.RandomState(3)
    samples = []
    for _ in range(20):
        idx = rs.choice(half, size=half, replace=True)
        rows = np.concatenate([idx, idx + half])
        lr = TightLogisticRegression(fit_intercept=False).fit(X[rows], Y[rows])
        r = 400 * lr.coef_[0][:len(models)] + 1000
        samples.append(r - r[models["llama-13b"]] + 800)
    samples = np.array(samples)
    board = rating.board(outcomes(battles, style=True), rounds=20, seed=3, anchor=("llama-13b", 800.0),
                         style_control=True)
    for row in board.rows:
        i = models[row.key]
        assert row.lower == pytest.approx(np.quantile(samples[:, i], 0.025), abs=1e-3)
        assert row.upper == pytest.approx(np.quantile(samples[:, i], 0.975), abs=1e-3)


def test_win_fraction_and_counts_equal_fschat(fschat):
    battles = random_battles(5, n=200)
    df = pd.DataFrame(battles)
    order = ["vicuna", "alpaca", "llama-13b", "koala", "dolly"]
    expected = fschat.compute_pairwise_win_fraction(df[~df["winner"].str.contains("tie")], order)
    fraction, counts = rating.pair_tables(outcomes(battles), order)
    for a in order:
        for b in order:
            if a != b:
                assert fraction[a][b] == pytest.approx(expected.loc[a, b], abs=1e-12)
    pairs = pd.pivot_table(df, index="model_a", columns="model_b", aggfunc="size", fill_value=0)
    both = pairs.add(pairs.T, fill_value=0)
    assert all(counts[a][b] == both.loc[a, b] for a in order for b in order if a != b)


def test_rank_ranges_from_intervals():
    lower = {"a": 1100, "b": 1050, "c": 900}
    upper = {"a": 1200, "b": 1150, "c": 1000}
    assert rating.rank_ranges(lower, upper) == {"a": (1, 2), "b": (1, 2), "c": (3, 3)}


def test_bad_votes_are_named():
    with pytest.raises(ValueError, match="battle 1: winner"):
        rating.fit_ratings([Outcome("a", "b", "model_a"), Outcome("a", "b", "a")])
