"""Int8 activations for prompts on q4 weights: an opt-in trade of exactness for prompt speed.

herd's packed q4 linears quantize activations to int16 per block of 32, which keeps the quantized path's
greedy tokens equal to the dequantized fp32 path's (tests/test_quant.py) and its results independent of
how many tokens share a call. llama.cpp quantizes activations to int8 instead; AVX2's byte multiply
(vpmaddubsw) then does a q4 block in about half the instructions. Measured on the 2-core AVX2 EPYC, a
2048 x 8192 Q4_K matmul of 64-512 tokens: ~128 GMAC/s against ~82 for an fp32 GEMM of the dequantized
weight; a Llama-3.2-1B-shaped Q4_K_M prompt of 512 tokens: 97 tokens/s against 71 (llama.cpp: 92).

The price: each product is off by about 5e-3 relative (int8 rounding of the activations), SmolLM2's
next-token top-1 agreement with the fp32 path falls from 100% to 97.9% over 512 prompt tokens
(perplexity within 0.1%), and a prompt computed in a call of fewer than `min_tokens` tokens (alone, or
a short remainder after a prefix-cache hit) rounds differently from the same prompt batched with others,
so batched and unbatched outputs may differ. Hence off by default: `herd.load(..., prompt_int8=True)`.
"""

from __future__ import annotations

from torch import nn

from herd.quant.linear import PackedLinear

MIN_TOKENS = 64  # below this a call is a decode step or a short chunk: int16 keeps it exact


def use_int8_prompts(model: nn.Module, min_tokens: int = MIN_TOKENS) -> int:
    """Route calls of `min_tokens` tokens or more on every packed linear through int8 activations (the
    kernel applies it to q4 records only); returns the number of linears changed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, PackedLinear):
            module.int8_tokens = min_tokens
            changed += 1
    return changed


__all__ = ["use_int8_prompts", "MIN_TOKENS"]
