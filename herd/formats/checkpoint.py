"""Checkpoint: what every format reader hands to the loader.

Tensors use one vocabulary and one layout whatever the file:
- names are Meta's (`tok_embeddings.weight`, `layers.N.attention.wq.weight`, `layers.N.feed_forward.w1.weight`, ...);
- q/k rows are in Meta's interleaved RoPE order (pairs (2i, 2i+1) rotate together);
- Linear weights are [out, in]; Llama 4 routed experts are stacked [E, out, in]:
  `layers.N.feed_forward.experts.w1` / `.w3` [E, F, D] and `.w2` [E, D, F];
  router `layers.N.feed_forward.router.weight` [E, D]; shared expert `layers.N.feed_forward.shared_expert.w{1,2,3}.weight`.
Values are torch tensors (memory-mapped where the format allows), herd.quant.GGMLTensor blocks kept as stored,
or herd.quant.Int4Weight / Int8Weight (files written by `herd quantize`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from herd.config import ModelArgs
from herd.quant import GGMLTensor, Int4Weight, Int8Weight

TensorLike = Union[torch.Tensor, GGMLTensor, Int4Weight, Int8Weight]


@dataclass
class TokenizerSource:
    """Where the tokenizer lives; herd.tokenizer.load_tokenizer turns it into a Tokenizer."""

    kind: str  # "gguf" | "hf_json" | "tiktoken" | "sentencepiece"
    path: Path | None = None  # tokenizer.json / tokenizer.model
    gguf_metadata: dict[str, Any] | None = None  # the tokenizer.* keys of a GGUF file
    config: dict[str, Any] = field(default_factory=dict)  # tokenizer_config.json / special-token facts, if any


@dataclass
class Checkpoint:
    args: ModelArgs
    tensors: dict[str, TensorLike]
    format: str  # "gguf" | "hf" | "meta"
    path: Path
    tokenizer: TokenizerSource | None = None
    chat_template: str | None = None  # Jinja template shipped with the weights, if any
    generation: str = "unknown"  # "1", "2", "3", "3.1", "3.2", "4": chooses the built-in chat format
    quantization: str = "none"  # human summary: "F32", "Q4_1 (210), Q8_0 (1), F32 (61)", "bf16", ...
    eos_token_ids: tuple[int, ...] = ()  # ids that end a reply, beyond the tokenizer's own EOS
    metadata: dict[str, Any] = field(default_factory=dict)  # everything else worth showing (model name, ...)
    projector: Path | None = None  # a GGUF image projector file (mmproj) whose tensors joined `tensors`
