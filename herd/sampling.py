"""Sampling: parameters, logits processors and the draw; shared by the generator and the batching engine.

Order (HF / vLLM): logit_bias and penalties (`apply_penalties`), then temperature, top-k, top-p, min-p
(`filter_logits`), then the draw (`sample`). Everything works on a batch [B, V] with one SamplingParams
for all rows or a list with one per row.

Semantics:
- repetition_penalty (HF/vLLM): over every token seen (prompt and output), positive logits are divided
  by it and negative ones multiplied;
- presence_penalty / frequency_penalty (OpenAI): over output tokens only, subtract
  presence * [count > 0] + frequency * count;
- temperature 0 is greedy (argmax); top_k 0, top_p 1 and min_p 0 disable their filter. Filtered tokens
  get -inf; the most likely token always survives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from herd.errors import SamplingError

SEED_RANGE = (-(2**63), 2**64 - 1)

@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; 1 = off
    min_p: float = 0.0  # keep tokens with probability >= min_p * the top probability; 0 = off
    repetition_penalty: float = 1.0  # > 1 discourages any token already seen (prompt + output)
    presence_penalty: float = 0.0  # OpenAI, -2..2, once per token present in the output
    frequency_penalty: float = 0.0  # OpenAI, -2..2, per occurrence in the output
    seed: int | None = None  # seeds the caller's torch.Generator (see make_generator)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI: -100..100)

    def __post_init__(self) -> None:
        def number(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SamplingError(name, f"must be a finite number, got {v!r}")
            return float(v)

        if number("temperature") < 0:
            raise SamplingError("temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError("top_k", f"must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < number("top_p") <= 1:
            raise SamplingError("top_p", f"must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0 <= number("min_p") <= 1:
            raise SamplingError("min_p", f"must be in [0, 1] (0 = off), got {self.min_p}")
        if number("repetition_penalty") <= 0:
            raise SamplingError("repetition_penalty", f"must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= number(name) <= 2:
                raise SamplingError(name, f"must be in [-2, 2] (0 = off), got {getattr(self, name)}")
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, int):
                raise SamplingError("seed", f"must be an integer or None, got {self.seed!r}")
            if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:  # what torch.Generator.manual_seed takes
                raise SamplingError("seed", f"must lie in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {self.seed}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise SamplingError("logit_bias", "must be a dict of token id -> bias, got "
                                                  f"{type(self.logit_bias).__name__}")
            for k, v in self.logit_bias.items():
                try:
                    token = int(k)  # JSON gives string keys
                except (TypeError, ValueError):
                    raise SamplingError("logit_bias", f"keys must be token ids, got {k!r}") from None
                if token < 0 or isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                    raise SamplingError("logit_bias", f"[{k!r}] = {v!r}: ids must be >= 0 and biases in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


ParamsArg = Union[SamplingParams, Sequence[SamplingParams]]
TokensArg = Union[torch.Tensor, Sequence[Sequence[int]], Sequence[torch.Tensor]]


def _rows(params: ParamsArg, batch: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * batch
    rows = list(params)
    if len(rows) != batch or not all(isinstance(p, SamplingParams) for p in rows):
        raise ValueError(f"expected one SamplingParams or a list of {batch} (one per row), got {len(rows)} items")
    return rows


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A torch.Generator seeded from params.seed, or None to use torch's global RNG. Keep it for the whole
    request: reseeding every step would repeat the same random numbers."""
    if params.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed)
    return g


def _counts(tokens: TokensArg, batch: int, vocab: int, device: torch.device,
            n_prompt: int | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(seen [B, V] bool over all tokens, counts [B, V] over tokens after the first n_prompt of each row).
    Negative ids (padding) and ids >= V are ignored."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 2 or tokens.shape[0] != batch:
            raise ValueError(f"prev_tokens tensor must be [B={batch}, T], got {tuple(tokens.shape)}")
        padded = tokens.to(device=device, dtype=torch.long)
    else:
        if len(tokens) != batch:
            raise ValueError(f"prev_tokens must have one row per batch row ({batch}), got {len(tokens)}")
        rows = [torch.as_tensor(r, dtype=torch.long, device=device).reshape(-1) for r in tokens]
        padded = torch.full((batch, max((len(r) for r in rows), default=0)), -1, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            padded[i, : len(r)] = r
    padded = torch.where((padded < 0) | (padded >= vocab), torch.full_like(padded, vocab), padded)
    starts = torch.as_tensor([n_prompt] * batch if isinstance(n_prompt, int) else list(n_prompt), device=device)
    in_prompt = torch.arange(padded.shape[1], device=device)[None, :] < starts[:, None]
    output = torch.where(in_prompt, torch.full_like(padded, vocab), padded)
    seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=device)
    seen.scatter_(1, padded, True)
    counts = torch.zeros(batch, vocab + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, output, torch.ones_like(output, dtype=torch.float32))
    return seen[:, :vocab], counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, prev_tokens: TokensArg | None, params: ParamsArg,
                    n_prompt: int | Sequence[int] = 0) -> torch.Tensor:
    """Logit bias, repetition, presence and frequency penalties on logits [B, V] (a new float32 tensor).

    prev_tokens: per row, every token so far (prompt then output), as a [B, T] LongTensor (negative
    ids are padding) or a list of sequences. n_prompt: how many leading tokens of each row are prompt
    (an int for all rows or one per row); presence/frequency penalties count only the tokens after them,
    the repetition penalty counts all."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got {tuple(logits.shape)}")
    batch, vocab = logits.shape
    rows = _rows(params, batch)
    out = logits.to(torch.float32).clone()
    for i, p in enumerate(rows):
        if p.logit_bias:
            ids = torch.tensor([int(k) for k in p.logit_bias], dtype=torch.long, device=out.device)
            if int(ids.max()) >= vocab:
                raise ValueError(f"logit_bias names token {int(ids.max())}, but the vocabulary has {vocab} tokens")
            out[i].index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), dtype=out.dtype, device=out.device))
    rep = [p.repetition_penalty for p in rows]
    pres = [p.presence_penalty for p in rows]
    freq = [p.frequency_penalty for p in rows]
    if prev_tokens is None or all(r == 1 for r in rep) and not any(pres) and not any(freq):
        return out
    seen, counts = _counts(prev_tokens, batch, vocab, out.device, n_prompt)
    if any(r != 1 for r in rep):
        # In float64, so that an extreme penalty (1e-300, 1e300) is not rounded to 0 or inf first. A penalty that
        # float32 holds is used at its float32 value (as before, and as HF's float32 arithmetic): the float64
        # quotient and product of float32 values round back to the float32 result bit for bit. A row whose best
        # logit leaves float32's range moves down as a whole (softmax does not change), so the likeliest boosted
        # token stays the likeliest and finite; a logit pushed below float32's range becomes -inf, banned.
        r64 = torch.tensor(rep, dtype=torch.float64, device=out.device)[:, None]
        r32 = r64.float()
        r = torch.where((r32 > 0) & torch.isfinite(r32), r32.double(), r64)
        wide = out.double()
        wide = torch.where(seen, torch.where(wide > 0, wide / r, wide * r), wide)
        over = (wide.max(dim=-1, keepdim=True).values - torch.finfo(out.dtype).max).clamp(min=0).nan_to_num(0.0)
        out = (wide - over).to(out.dtype)
    if any(pres) or any(freq):
        f = torch.tensor(freq, dtype=out.dtype, device=out.device)[:, None]
        pr = torch.tensor(pres, dtype=out.dtype, device=out.device)[:, None]
        out = out - f * counts - pr * (counts > 0).to(out.dtype)
    return out


def filter_logits(logits: torch.Tensor, params: ParamsArg) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p on logits [B, V]: a float32 tensor of scaled logits (shifted
    so that each row's best is 0: the same distribution) with -inf outside each row's allowed set (a greedy row keeps only its argmax). The argmax always stays."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got {tuple(logits.shape)}")
    batch, vocab = logits.shape
    rows = _rows(params, batch)
    x = logits.to(torch.float32)
    best = x.argmax(dim=-1, keepdim=True)
    dev = x.device
    # Scaled relative to the row's best logit, and by at least float32's smallest normal number: the best
    # token's scaled logit is 0 and every other one is <= 0, so a tiny temperature (1e-45, below float32's
    # range) gives the limit it tends to, the argmax (ties share), instead of inf / inf = NaN. top-k/top-p/
    # min-p and the draw see only differences, which the shift leaves as they were.
    tiny = torch.finfo(torch.float32).tiny
    temps = torch.tensor([max(p.temperature, tiny) if p.temperature > 0 else 1.0 for p in rows], dtype=x.dtype,
                         device=dev)
    top = x.gather(1, best)
    x = (x - torch.where(torch.isfinite(top), top, torch.zeros_like(top))) / temps[:, None]
    neg_inf = torch.tensor(float("-inf"), dtype=x.dtype, device=dev)

    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in rows]
    if any(ks):
        k = torch.tensor([k or vocab for k in ks], dtype=torch.long, device=dev)
        top = torch.topk(x, int(k.max()), dim=-1).values  # [B, kmax], descending
        kth = top.gather(1, (k - 1).clamp(max=top.shape[1] - 1)[:, None])
        x = torch.where(x < kth, neg_inf, x)  # ties with the k-th value are kept, as HF does

    if any(p.top_p < 1 for p in rows):
        top_p = torch.tensor([p.top_p if p.top_p < 1 else 2.0 for p in rows], dtype=x.dtype, device=dev)
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # probability mass of the more likely tokens
        drop_sorted = before >= top_p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        x = torch.where(drop, neg_inf, x)

    if any(p.min_p > 0 for p in rows):
        min_p = torch.tensor([p.min_p for p in rows], dtype=x.dtype, device=dev)
        probs = torch.softmax(x, dim=-1)
        x = torch.where(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, neg_inf, x)

    greedy = torch.tensor([p.temperature == 0 for p in rows], device=dev)
    if bool(greedy.any()):
        only_best = torch.full_like(x, float("-inf")).scatter(1, best, x.gather(1, best))
        x = torch.where(greedy[:, None], only_best, x)
    return x.scatter(1, best, x.gather(1, best).nan_to_num(nan=0.0, neginf=0.0))


def sample(logits: torch.Tensor, params: ParamsArg,
           generator: torch.Generator | Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
    """One token id per row of logits [B, V] → LongTensor [B]. Apply penalties first (apply_penalties);
    this applies filter_logits and draws. Greedy rows (temperature 0) take the argmax. `generator`: one
    torch.Generator for the batch, one per row (per-request seeds in a batch), or None for the global RNG;
    the same generator state gives the same tokens."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got {tuple(logits.shape)}")
    batch = logits.shape[0]
    rows = _rows(params, batch)
    if all(p.temperature == 0 for p in rows):
        return logits.argmax(dim=-1)
    x = filter_logits(logits, rows)
    probs = torch.softmax(x, dim=-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws index i with probability p_i.
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"expected {batch} generators (one per row), got {len(generator)}")
        noise = torch.stack([torch.empty_like(probs[i]).exponential_(generator=g) for i, g in enumerate(generator)])
    else:
        noise = torch.empty_like(probs).exponential_(generator=generator)
    drawn = (probs / noise.clamp_min(1e-20)).argmax(dim=-1)
    greedy = torch.tensor([p.temperature == 0 for p in rows], device=logits.device)
    return torch.where(greedy, logits.argmax(dim=-1), drawn)
