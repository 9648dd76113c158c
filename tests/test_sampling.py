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


def test_invalid_params_are_herd_errors_naming_the_field():
    """The library, the server (400) and the CLI (one line naming the flag) all read SamplingError's field."""
    from herd.errors import HerdError, SamplingError

    with pytest.raises(SamplingError) as e:
        SamplingParams(top_p=5.0)
    assert isinstance(e.value, HerdError) and isinstance(e.value, ValueError)
    assert e.value.field == "top_p" and "(0, 1]" in e.value.problem


@pytest.mark.parametrize("seed, ok", [(0, True), (2**64 - 1, True), (-(2**63), True), (2**64, False), (2**70, False),
                                      (-(2**63) - 1, False)])
def test_seed_range_is_what_torch_generators_take(seed, ok):
    """The reference is torch.Generator.manual_seed itself: a seed SamplingParams accepts must seed a generator,
    one it refuses must be one torch cannot take (before, 2^70 passed and failed inside generation)."""
    try:
        torch.Generator().manual_seed(seed)
        torch_takes = True
    except (RuntimeError, ValueError, OverflowError):
        torch_takes = False
    assert torch_takes == ok
    if ok:
        assert make_generator(SamplingParams(seed=seed)) is not None
    else:
        with pytest.raises(ValueError, match="seed"):
            SamplingParams(seed=seed)


@pytest.mark.parametrize("temperature", [1e-45, 1e-50, 1e-38, 1e-12])
def test_a_tiny_positive_temperature_samples_the_argmax(temperature):
    """Temperature T -> 0 tends to the argmax (greedy); 1e-45 is below float32's range, where x / T used to give
    inf / inf = NaN probabilities and the draw token 0 (an empty reply, finish "stop")."""
    logits = torch.stack([peaked_logits(seed=s) for s in range(16)])
    params = SamplingParams(temperature=temperature, top_p=0.9)
    shaped = filter_logits(logits, params)
    assert not torch.isnan(shaped).any()
    for draw in range(5):
        assert torch.equal(sample(logits, params, torch.Generator().manual_seed(draw)), logits.argmax(-1))
    # exact ties share the draw, as the limit says
    tied = torch.tensor([[1.0, 5.0, 5.0, 2.0]]).expand(400, -1)
    got = sample(tied, SamplingParams(temperature=1e-45), torch.Generator().manual_seed(0))
    assert set(got.tolist()) == {1, 2}


@pytest.mark.parametrize("penalty", [1e-300, 1e-45, 1e300])
def test_extreme_repetition_penalties_follow_their_limit(penalty):
    """Penalty r: a seen token's positive logit / r, negative one * r (HF). Computed exactly (float64, numpy), the
    likeliest token of the penalized row must be what herd samples greedily and at a low temperature, with no
    NaN and no empty draw (before, 1e-300 turned into a float32 0: division by zero, inf logits, NaN)."""
    logits = torch.stack([peaked_logits(seed=s) for s in range(8)])
    history = [[int(t) for t in torch.randperm(256, generator=torch.Generator().manual_seed(s))[:40]] for s in range(8)]
    x = logits.double().numpy().copy()
    for i, seen in enumerate(history):
        for t in set(seen):
            x[i, t] = x[i, t] / penalty if x[i, t] > 0 else x[i, t] * penalty
    want = x.argmax(-1)
    for params in (SamplingParams(repetition_penalty=penalty, temperature=0),
                   SamplingParams(repetition_penalty=penalty, temperature=0.05, seed=1)):
        shaped = apply_penalties(logits, history, params)
        assert not torch.isnan(shaped).any() and not torch.isposinf(shaped).any()
        assert not torch.isnan(filter_logits(shaped, params)).any()
        assert sample(shaped, params, make_generator(params)).tolist() == want.tolist()


def test_ordinary_repetition_penalties_are_unchanged_float32_arithmetic():
    """The float64 path must not move an ordinary penalty's result by one bit: the reference is the float32
    formula HF's RepetitionPenaltyLogitsProcessor applies (torch.where(score < 0, score * r, score / r))."""
    logits = torch.stack([peaked_logits(seed=s) for s in range(4)]) * 3
    history = [[1, 2, 3, 200], [4, 5], [9] * 3, list(range(0, 256, 3))]
    for r in (1.1, 1.3, 0.7, 2.0, 1.05):
        want = logits.clone()
        for i, seen in enumerate(history):
            idx = torch.tensor(sorted(set(seen)))
            score = want[i, idx]
            want[i, idx] = torch.where(score < 0, score * r, score / r)
        assert torch.equal(apply_penalties(logits, history, SamplingParams(repetition_penalty=r)), want), r


def test_smollm2_replies_at_extreme_settings(smollm2_q):
    """Through the library on the real model: temperature 1e-45 answers as greedy does; repetition_penalty 1e-300
    still answers (before, both gave an empty reply with finish "stop")."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    greedy = smollm2_q.chat(messages, temperature=0, max_tokens=8)
    tiny = smollm2_q.chat(messages, temperature=1e-45, max_tokens=8, seed=3)
    assert tiny.text == greedy.text and tiny.token_ids == greedy.token_ids and tiny.text.strip()
    boosted = smollm2_q.chat(messages, repetition_penalty=1e-300, temperature=0, max_tokens=8)
    assert boosted.text.strip()
