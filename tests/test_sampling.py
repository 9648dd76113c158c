"""herd.sampling against independent numpy computations of the same definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from herd.sampling import SamplingParams, apply_penalties, filter_logits, make_generator, sample


def peaked_logits(vocab: int = 256, seed: int = 0) -> torch.Tensor:
    """A realistic next-token distribution: a few likely tokens over a long tail."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, vocab)
    logits[rng.choice(vocab, 6, replace=False)] += rng.uniform(3.0, 6.0, 6)
    return torch.tensor(logits, dtype=torch.float32)


def np_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return p / p.sum()


def np_allowed(logits: np.ndarray, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, slack=1e-6) -> set[int]:
    """The allowed set by the definitions (HF order: top-k, then top-p, then min-p), with a little slack
    at the top-p boundary for float32 rounding."""
    p = np_probs(logits, temperature)
    keep = np.ones_like(p, dtype=bool)
    if top_k:
        keep &= p >= np.sort(p)[::-1][top_k - 1]
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    if top_p < 1:
        order = np.argsort(-q)
        before = np.cumsum(q[order]) - q[order]
        ok = np.zeros_like(keep)
        ok[order] = before < top_p + slack
        keep &= ok
    if min_p > 0:
        keep &= p >= min_p * p.max() * (1 - slack)
    return set(np.flatnonzero(keep).tolist())


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.1), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(seed="42"), "seed"),
    (dict(logit_bias={5: 101}), "logit_bias"),
    (dict(logit_bias={"x": 1}), "logit_bias"),
    (dict(logit_bias=[1, 2]), "logit_bias"),
])
def test_invalid_params_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_fixed_seed_reproduces():
    logits = torch.stack([peaked_logits(seed=s) for s in range(8)])
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)

    def run():
        g = make_generator(params)
        return torch.stack([sample(logits, params, g) for _ in range(20)])

    first = run()
    assert torch.equal(first, run())
    other = torch.stack([sample(logits, params, make_generator(SamplingParams(seed=99))) for _ in range(20)])
    assert not torch.equal(first, other)
    assert first.dtype == torch.long and first.shape == (20, 8)


def test_top_k_1_and_temperature_0_are_greedy():
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)) * 4
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, SamplingParams(temperature=1.7, top_k=1), g), logits.argmax(-1))
    assert torch.equal(sample(logits, SamplingParams(temperature=0.0), g), logits.argmax(-1))
    assert torch.equal(sample(logits, SamplingParams(min_p=1.0), g), logits.argmax(-1))
    assert torch.equal(sample(logits, SamplingParams(top_p=1e-9), g), logits.argmax(-1))


@pytest.mark.parametrize("kwargs", [
    dict(top_p=0.8),
    dict(min_p=0.1),
    dict(temperature=0.7, top_p=0.9, min_p=0.02),
    dict(temperature=1.3, top_k=20, top_p=0.95),
])
def test_filters_never_leave_the_allowed_set(kwargs):
    logits = peaked_logits(seed=7)
    allowed = np_allowed(logits.numpy(), **kwargs)
    draws = 20000
    tokens = sample(logits.expand(draws, -1), SamplingParams(**kwargs), torch.Generator().manual_seed(3))
    assert set(tokens.tolist()) <= allowed
    # The draw follows the renormalised distribution over the allowed set.
    p = np_probs(logits.numpy(), kwargs.get("temperature", 1.0))
    mask = np.zeros_like(p)
    mask[list(allowed)] = 1
    want = p * mask / (p * mask).sum()
    got = np.bincount(tokens.numpy(), minlength=len(p)) / draws
    assert np.abs(got - want).max() < 0.02
    kept = torch.isfinite(filter_logits(logits[None], SamplingParams(**kwargs))[0]).nonzero().flatten().tolist()
    assert set(kept) == allowed


def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    history = [[0, 1, 3, 3]]  # prompt [0], output [1, 3, 3]
    params = SamplingParams(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.25)
    # Repetition over prompt+output {0, 1, 3}: positive / 1.5, negative * 1.5. Then, over the output only,
    # minus frequency * count and presence * [count > 0].
    want = np.array([2.0 / 1.5,
                     -1.0 * 1.5 - 0.25 * 1 - 0.5,
                     0.5,
                     3.0 / 1.5 - 0.25 * 2 - 0.5,
                     -2.0])
    got = apply_penalties(logits, history, params, n_prompt=1)
    np.testing.assert_allclose(got.numpy()[0], want, rtol=1e-6)
    padded = torch.tensor([[0, 1, 3, 3, -1, -1]])  # tensor form with padding gives the same
    np.testing.assert_allclose(apply_penalties(logits, padded, params, n_prompt=[1]).numpy()[0], want, rtol=1e-6)
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]]))  # the input is not modified
    biased = apply_penalties(logits, None, SamplingParams(logit_bias={"4": 10.0, 0: -100}))
    np.testing.assert_allclose(biased.numpy()[0], [-98.0, -1.0, 0.5, 3.0, 8.0])
    with pytest.raises(ValueError, match="vocabulary"):
        apply_penalties(logits, None, SamplingParams(logit_bias={5: 1.0}))


def test_per_row_params_match_single_rows():
    logits = torch.stack([peaked_logits(seed=s) for s in range(4)])
    rows = [SamplingParams(temperature=0), SamplingParams(top_k=5, seed=1), SamplingParams(top_p=0.7, seed=2),
            SamplingParams(min_p=0.2, temperature=0.5, repetition_penalty=1.2, seed=3)]
    history = [[1, 2, 3], [4], [], [5, 5, 6]]
    shaped = apply_penalties(logits, history, rows, n_prompt=[1, 0, 0, 2])
    for i, p in enumerate(rows):
        single = apply_penalties(logits[i : i + 1], [history[i]], p, n_prompt=[1, 0, 0, 2][i])
        torch.testing.assert_close(shaped[i : i + 1], single)
        torch.testing.assert_close(filter_logits(shaped, rows)[i : i + 1], filter_logits(single, p))
    gens = [make_generator(p) for p in rows]
    batched = torch.stack([sample(shaped, rows, gens) for _ in range(10)], dim=1)
    for i, p in enumerate(rows):
        g = make_generator(p)
        alone = torch.stack([sample(shaped[i : i + 1], p, g)[0] for _ in range(10)])
        assert torch.equal(batched[i], alone)
    assert (batched[0] == logits[0].argmax()).all()
