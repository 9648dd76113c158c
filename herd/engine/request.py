"""What goes into the engine and what comes out: the only engine types API code sees."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from herd.decoding import TokenLogprob
from herd.sampling import SamplingParams


class QueueFull(Exception):
    """The engine's waiting queue is at its bound; the caller should retry later (HTTP 429)."""


@dataclass(frozen=True, eq=False)
class ImagePlacement:
    """One image of a prompt: its preprocessed `tiles`, `digest` (SHA-256 of the tiles: the key of the
    encoder-output cache and of the prefix-cache blocks it touches) and `positions`: for Llama 4 the prompt
    indices whose embeddings its feature rows replace, in order; for Llama 3.2 Vision its <|image|> token."""

    tiles: Any
    digest: str
    positions: tuple[int, ...]
    affects_from: int | None = None  # first position whose keys depend on the image (None: positions[0])
    ratio_id: int = 0  # Llama 3.2 Vision: the tile arrangement's id
    n_tiles: int = 0  # Llama 3.2 Vision: tiles the image fills (the rest of tiles is padding)


@dataclass
class Request:
    request_id: str  # unique among live requests; abort() and outputs use it
    prompt_ids: list[int]  # token ids the model sees, used as given (BOS included if wanted)
    max_tokens: int  # most tokens to generate; 0 = only prefill (prompt logprobs)
    params: SamplingParams = field(default_factory=SamplingParams)  # temperature, top_p, penalties, seed ...
    stop_ids: frozenset[int] = frozenset()  # token ids that end generation (not part of the text)
    stop: tuple[str, ...] = ()  # strings that end generation (cut from the text)
    logprobs: int | None = None  # None: no logprobs; n >= 0: chosen token's logprob + top n alternatives
    prompt_logprobs: int | None = None  # None, or n >= 0: logprobs of every prompt token (first is None)
    constraint: Any = None  # a herd.engine.constrained.Constraint factory (json_schema / json_object), or None
    adapter: int = 0  # which of the model's LoRA adapters computes this request (0: the base alone)
    images: tuple[ImagePlacement, ...] = ()  # images whose features replace prompt embeddings (Llama 4)


@dataclass
class RequestOutput:
    request_id: str
    text: str = ""  # text that became final in this step (may be "" while held back)
    token_ids: list[int] = field(default_factory=list)  # tokens generated in this step
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, on the first output, when asked for
    finish_reason: str | None = None  # None while running; "stop", "length", "abort" or "error"
    prompt_tokens: int = 0  # prompt length
    completion_tokens: int = 0  # tokens generated so far
    cached_tokens: int = 0  # prompt tokens whose keys came from the prefix cache (not computed)
    error: str | None = None  # set with finish_reason "error": what went wrong (the server answers 500)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
