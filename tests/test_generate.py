"""Generation on the real SmolLM2 model: KV-cache decode, stops, logprobs, seeds, context errors."""

import pytest
import torch

from herd.errors import ContextOverflow
from herd.decoding import StopStringMatcher


def test_cached_decode_equals_full_forward_logprobs(smollm2):
    """Logprobs from incremental decode equal log-softmax of one full forward over the same tokens."""
    ids = smollm2.tokenizer.encode("The three primary colours are")
    out = smollm2.generate(ids, max_tokens=12, temperature=0, logprobs=3, stop_token_ids=[])
    full = torch.log_softmax(smollm2.logits(ids + out.token_ids[:-1]), dim=-1)[len(ids) - 1 :]
    for i, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(full[i, lp.token_id].item(), abs=1e-4)
        assert lp.top[0][0] == int(full[i].argmax())  # greedy picks the top alternative
        assert len(lp.top) == 3


def test_seed_reproduces_and_differs(smollm2):
    kwargs = dict(max_tokens=20, temperature=1.0, top_p=0.95, stop_token_ids=[])
    a = smollm2.generate("Tell me a story about", seed=7, **kwargs)
    b = smollm2.generate("Tell me a story about", seed=7, **kwargs)
    c = smollm2.generate("Tell me a story about", seed=8, **kwargs)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_top_k_one_is_greedy(smollm2):
    greedy = smollm2.generate("My favourite food is", max_tokens=16, temperature=0)
    topk1 = smollm2.generate("My favourite food is", max_tokens=16, temperature=1.3, top_k=1, seed=3)
    assert greedy.token_ids == topk1.token_ids


def test_stop_string_spanning_tokens(smollm2):
    """Pick a stop string that straddles a token boundary of the greedy output; the text ends right before it."""
    full = smollm2.generate("Once upon a time", max_tokens=30, temperature=0, stop_token_ids=[])
    pieces = [smollm2.tokenizer.decode([t]) for t in full.token_ids]
    boundary = len(pieces[0]) + len(pieces[1])  # end of the second token
    stop = full.text[boundary - 2 : boundary + 2]
    assert len(stop) == 4 and stop not in full.text[: boundary - 2]
    cut = smollm2.generate("Once upon a time", max_tokens=30, temperature=0, stop=stop, stop_token_ids=[])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    streamed = "".join(s.text for s in smollm2.stream("Once upon a time", max_tokens=30, temperature=0, stop=[stop]))
    assert streamed == cut.text


def test_stop_matcher_holds_back_prefixes():
    m = StopStringMatcher(["</end>"])
    assert m.feed("hello </e") == ("hello ", False)
    assert m.feed("nd> more") == ("", True)
    m = StopStringMatcher(["ab"])
    assert m.feed("xa") == ("x", False)
    assert m.feed("c") == ("ac", False)


def test_context_overflow_names_both_numbers(smollm2):
    ids = smollm2.tokenizer.encode("word " * 50)
    with pytest.raises(ContextOverflow) as e:
        smollm2.generate(ids, max_tokens=smollm2.config.max_seq_len)
    assert str(len(ids)) in str(e.value) and str(smollm2.config.max_seq_len) in str(e.value)


def test_length_finish(smollm2):
    out = smollm2.generate("Count: 1, 2, 3,", max_tokens=5, temperature=0, stop_token_ids=[])
    assert out.finish_reason == "length" and out.completion_tokens == 5
    assert out.text == smollm2.tokenizer.decode(out.token_ids)


@pytest.mark.parametrize("option,value", [("top_p", 0.6), ("min_p", 0.05)])
def test_filters_never_leave_the_allowed_set_on_real_logits(smollm2, option, value):
    """Allowed sets computed independently with numpy from SmolLM2's real next-token distribution."""
    import numpy as np

    from herd.sampling import SamplingParams, sample

    ids = smollm2.tokenizer.encode("My favourite animal is the")
    logits = smollm2.logits(ids)[-1]
    probs = np.exp(logits.double().numpy() - logits.double().numpy().max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    if option == "top_p":  # smallest prefix of the sorted distribution whose mass reaches p
        allowed = set(order[: int(np.searchsorted(np.cumsum(probs[order]), value)) + 1].tolist())
    else:
        allowed = set(np.nonzero(probs >= value * probs.max())[0].tolist())
    assert 1 < len(allowed) < len(probs) // 20  # a real choice, not a trivial one
    params = SamplingParams(temperature=1.0, **{option: value})
    generator = torch.Generator().manual_seed(0)
    drawn = sample(logits[None].repeat(2000, 1), params, generator).tolist()
    assert set(drawn) <= allowed
    assert len(set(drawn)) > 1
