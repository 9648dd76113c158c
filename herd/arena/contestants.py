"""Who fights: local models herd loads (generation through herd's engine), and OpenAI-compatible endpoints.

A local contestant is identified by herd's fingerprint of its exact weights, which herd loaded and hashed
itself: the only kind of contestant the arena calls verified. An endpoint's weights are out of herd's sight.
A herd server's /v1/models card names the fingerprint of what it serves, and that is recorded as the
endpoint's identity, but as a claim: any server can send any card, so it is "claimed by the endpoint, not
verified". An endpoint without such a card gets a stand-in identity (a hash of its URL and model id), so a
changed endpoint cannot be told from an unchanged one. `verification()` says in words what was checked.

A contestant reports how an answer failed on its `Answer` (error: the details, for the operator's log;
context_full: the conversation no longer fits). The details may name the contestant, its model or its URL,
so they never reach a voter before the vote (herd.arena.service shows a neutral line instead).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from herd.errors import HerdError


MAX_WEIGHT = 1e6  # sampling weights are relative; past this the chances lose their precision


@dataclass
class Answer:
    text: str = ""
    tokens: int = 0
    error: str | None = None  # what went wrong, in detail (may name the contestant: for logs only)
    context_full: bool = False  # the conversation is longer than the contestant's context


def weight_problem(weight) -> str | None:
    """Why `weight` cannot be a sampling weight, or None: a finite number in (0, MAX_WEIGHT]."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        return f"must be a number, got {type(weight).__name__}"
    try:
        ok = math.isfinite(float(weight)) and 0 < weight <= MAX_WEIGHT
    except OverflowError:  # an int too large for a float
        ok = False
    shown = repr(weight) if isinstance(weight, float) or abs(weight) < 10**18 else "an integer past 10**18"
    return None if ok else f"must be a number > 0 and at most {MAX_WEIGHT:,.0f}, got {shown}"


def verification(kind: str, fingerprint: str, verified: bool) -> str:
    """What the arena checked about a contestant's weights, in words for the page and the record."""
    if verified:
        return "verified: herd loaded these weights and computed their fingerprint itself"
    if fingerprint.startswith("unverified:"):
        return "not verified: the endpoint reports no fingerprint (this stands for its address and model id)"
    if fingerprint.startswith("unrecorded:"):
        return "not verified: the imported log records no fingerprint"
    if kind == "endpoint":
        return "claimed by the endpoint, not verified: herd cannot see an endpoint's weights"
    if kind == "imported":
        return "not verified: as recorded in an imported log; this arena did not load these weights"
    return "not verified"


class Contestant:
    name: str
    fingerprint: str
    verified: bool
    kind: str
    source: str
    weight: float = 1.0

    async def stream(self, messages: list[dict], sampling: dict, max_tokens: int,
                     answer: Answer) -> AsyncIterator[str]:  # pragma: no cover - interface
        raise NotImplementedError
        yield ""

    def close(self) -> None:
        pass


class LocalContestant(Contestant):
    """A herd.api.LLM answering through its own continuous-batching engine."""

    kind, verified = "local", True

    def __init__(self, name: str, llm, *, source: str = "", weight: float = 1.0, max_batch: int = 4,
                 context: int | None = None):
        from herd.engine import AsyncEngine, Engine

        self.name, self.llm, self.source, self.weight = name, llm, source, weight
        self.fingerprint = llm.fingerprint
        self.context = min(context or llm.config.max_seq_len, llm.config.max_seq_len)
        self.engine = AsyncEngine(Engine(llm.model, llm.tokenizer, max_batch=max_batch, context=self.context))
        self.engine.start()

    async def stream(self, messages, sampling, max_tokens, answer):
        from herd.engine import Request
        from herd.sampling import SamplingParams

        eot = self.llm.end_of_turn()
        ids = await asyncio.to_thread(self.llm.chat_prompt, messages)
        max_tokens = min(max_tokens, self.context - len(ids))
        if max_tokens <= 0:
            answer.error = f"the conversation ({len(ids)} tokens) fills {self.name}'s context of {self.context}"
            answer.context_full = True
            return
        request = Request(f"arena-{uuid.uuid4().hex}", ids, max_tokens, SamplingParams(**sampling),
                          stop_ids=frozenset(eot.token_ids), stop=tuple(eot.texts))
        async for out in self.engine.generate(request):
            answer.tokens = out.completion_tokens
            if out.error:
                answer.error = out.error
            if out.text:
                answer.text += out.text
                yield out.text

    def close(self):
        self.engine.stop(drain=False, timeout=30)


def endpoint_identity(base_url: str, model: str, api_key: str | None = None,
                      timeout: float = 10.0) -> tuple[str, bool]:
    """(fingerprint, claimed): the fingerprint the endpoint's model card claims (a herd server's card carries
    one), else a stand-in. Never verified: the card is the endpoint's word about itself."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(base_url.rstrip("/") + "/models", headers=headers, timeout=timeout)
        cards = r.json().get("data", []) if r.status_code == 200 else []
    except (httpx.HTTPError, ValueError, AttributeError):
        cards = []
    for card in cards if isinstance(cards, list) else []:
        if not isinstance(card, dict):
            continue
        fp = card.get("fingerprint")
        if card.get("id") == model and isinstance(fp, str) and re.fullmatch(r"[0-9a-f]{64}", fp) \
                and card.get("owned_by") == "herd":
            return fp, True
    return "unverified:" + hashlib.sha256(f"{base_url.rstrip('/')}\0{model}".encode()).hexdigest()[:32], False


class EndpointContestant(Contestant):
    """An OpenAI-compatible /v1/chat/completions endpoint, streamed. Its weights are never verified."""

    kind, verified = "endpoint", False

    def __init__(self, name: str, base_url: str, model: str, *, api_key: str | None = None, weight: float = 1.0,
                 timeout: float = 300.0):
        self.name, self.base_url, self.model, self.weight = name, base_url.rstrip("/"), model, weight
        self.api_key, self.timeout = api_key, timeout
        self.source = f"{self.base_url} ({model})"
        self.fingerprint, self.fingerprint_claimed = endpoint_identity(self.base_url, model, api_key)

    async def stream(self, messages, sampling, max_tokens, answer):
        import httpx

        body = {"model": self.model, "messages": messages, "stream": True, "max_tokens": max_tokens,
                "stream_options": {"include_usage": True},
                **{k: v for k, v in sampling.items() if k in ("temperature", "top_p", "seed") and v is not None}}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                async with client.stream("POST", self.base_url + "/chat/completions", json=body,
                                         headers=headers) as r:
                    if r.status_code != 200:
                        answer.error = f"{self.name} answered HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                        return
                    async for line in r.aiter_lines():
                        if not line.startswith("data:") or line.strip() == "data: [DONE]":
                            continue
                        chunk = json.loads(line[5:])
                        if chunk.get("usage"):
                            answer.tokens = chunk["usage"].get("completion_tokens") or answer.tokens
                        for choice in chunk.get("choices") or []:
                            text = (choice.get("delta") or {}).get("content") or ""
                            if text:
                                answer.text += text
                                yield text
        except (httpx.HTTPError, ValueError) as e:
            answer.error = f"{self.name}: {type(e).__name__}: {e}"


@dataclass
class ContestantSpec:
    """One [[contestant]] of arena.toml: `model` a herd source, or `url` (+ `model`, the endpoint's id)."""

    name: str
    model: str | None = None
    url: str | None = None
    api_key: str | None = None
    weight: float = 1.0
    options: dict = field(default_factory=dict)  # herd.load keywords (device, dtype, threads ...)

    def build(self, max_batch: int = 4, context: int | None = None) -> Contestant:
        if self.url:
            if not self.model:
                raise HerdError(f"contestant {self.name!r}: an endpoint needs `model` (its model id)")
            return EndpointContestant(self.name, self.url, self.model, api_key=self.api_key, weight=self.weight)
        if not self.model:
            raise HerdError(f"contestant {self.name!r}: give `model` (a herd source) or `url` (an endpoint)")
        from herd.api import load

        llm = load(self.model, **self.options)
        return LocalContestant(self.name, llm, source=str(self.model), weight=self.weight, max_batch=max_batch,
                               context=context)
