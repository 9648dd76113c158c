"""herd's CPU kernels (herd/kernels/cpu.cpp) against PyTorch's own ops and gguf-py's dequantization.

Weights whose scales are not fp16 in the file (Q4_K, Q5_K, Q6_K) are kept with fp16 scales: each weight is
then within 2^-11 of its scale and offset terms of gguf-py's value, which the tests bound exactly.
The quantized matmuls quantize activations to int16 per block of 32, so they are
compared with x @ W^T at the tolerance that their rounding allows; everything else must match PyTorch to fp32
rounding."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from gguf import quants

from herd import kernels
from herd.quant import GGMLTensor
from herd.quant.ggml import GGMLType
from herd.quant.linear import (Q4Linear, Q8Linear, QuantEmbedding, ggml_q4, ggml_q8, ggml_q8x, q4_from_ggml, q4_from_int4,
                               q8_from_ggml, quantize_int4)

pytestmark = pytest.mark.skipif(not kernels.load(), reason=f"herd kernels unavailable: {kernels.why_not()}")


def rel_err(got, want) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def gguf_tensor(qtype: Q, w: np.ndarray) -> tuple[GGMLTensor, torch.Tensor]:
    """w quantized by gguf-py, and gguf-py's own dequantization of it: the reference weights."""
    blocks = quants.quantize(w.astype(np.float32), qtype)
    ref = torch.from_numpy(quants.dequantize(blocks, qtype).reshape(w.shape).astype(np.float32))
    return GGMLTensor(int(qtype), w.shape, blocks.reshape(-1).view(np.uint8), qtype.name), ref


def assert_within_fp16_scales(got: torch.Tensor, want: torch.Tensor, q: torch.Tensor, d: torch.Tensor,
                              m: torch.Tensor) -> None:
    """got = d*q + m with d and m rounded to fp16 (herd's compact records): |got - want| <= 2^-11 (|d q| + |m|),
    d and m given per block of K/d.shape[1] and K/m.shape[1] inputs."""
    k = q.shape[1]
    d = d.float().repeat_interleave(k // d.shape[1], dim=1)
    m = m.float().repeat_interleave(k // m.shape[1], dim=1)
    bound = 2.0**-11 * ((d * q.float()).abs() + m.abs()) * (1 + 1e-6) + 1e-30
    assert ((got - want).abs() <= bound).all(), ((got - want).abs() / bound).max()


# 70 rows: eight full groups of 8 and a padded one; K = 96 an odd number of blocks; 576 is SmolLM2's width.
@pytest.mark.parametrize("k", [96, 576])
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0])
@pytest.mark.parametrize("tokens", [1, 2, 7, 40])  # 1: the decode loop, 2/7: tiles of 4 and a rest, 40: GEMM
def test_quantized_linear_is_the_ggml_matmul(qtype, k, tokens):
    rng = np.random.default_rng(k + tokens)
    gguf_w, ref_w = gguf_tensor(qtype, rng.standard_normal((70, k)) * 0.05)
    eight_bit = qtype in (Q.Q5_0, Q.Q5_1, Q.Q8_0)
    layer = q8_from_ggml([gguf_w]) if eight_bit else q4_from_ggml([gguf_w])
    assert isinstance(layer, Q8Linear if eight_bit else Q4Linear)
    assert torch.equal(layer.dequantize(), ref_w)  # the repacking loses nothing
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_1):  # fp16 scales in the file: the compact records hold them exactly
        assert layer.packed.shape[-1] == (160 if qtype != Q.Q5_1 else 304)
    x = torch.randn(1, tokens, k)
    want = x @ ref_w.T
    got = layer(x)
    assert got.shape == (1, tokens, 70) and got.dtype == torch.float32
    if tokens >= 16:  # many tokens: a float GEMM of the exact dequantized weight
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    else:  # activations as int16 per block of 32: 1/(2*32767) of the block's largest
        assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0])
def test_tied_embedding_rows_come_from_the_packed_output(qtype):
    gguf_w, ref_w = gguf_tensor(qtype, np.random.default_rng(3).standard_normal((70, 96)))
    output = q8_from_ggml([gguf_w]) if qtype == Q.Q8_0 else q4_from_ggml([gguf_w])
    embedding = QuantEmbedding(output)
    assert embedding.packed is output.packed  # one copy
    tokens = torch.tensor([[0, 69, 8], [3, 3, 64]])
    assert torch.equal(embedding(tokens), ref_w[tokens])
    with pytest.raises(RuntimeError, match="out of range"):
        embedding(torch.tensor([70]))


def test_q4_k_is_the_ggml_matmul():
    """Q4_K (gguf-py cannot quantize it): random blocks, as a file holds them, against gguf-py's dequantization."""
    from tests.test_quant import random_ggml

    t = random_ggml(GGMLType.Q4_K, 40, 512, 7)
    ref_w = torch.from_numpy(quants.dequantize(t.data, Q.Q4_K).reshape(40, 512).astype(np.float32))
    layer = q4_from_ggml([t])
    assert layer.packed.shape[-1] == 160  # scales d*sc rounded to fp16
    assert_within_fp16_scales(layer.dequantize(), ref_w, *ggml_q4(t))
    x = torch.randn(1, 512)
    assert rel_err(layer(x), x @ layer.dequantize().T) < 1e-4  # the kernel computes with what it holds


@pytest.mark.parametrize("qtype", [Q.Q5_K, Q.Q6_K])
@pytest.mark.parametrize("tokens", [1, 3, 20])
def test_q5_k_and_q6_k_are_the_ggml_matmul(qtype, tokens):
    """Q5_K and Q6_K (a scale per 16, offsets) as 8-bit blocks: random blocks, as a file holds them, against
    gguf-py's dequantization; 44 rows leave a padded group of 8."""
    from tests.test_quant import random_ggml

    t = random_ggml(GGMLType(int(qtype)), 44, 512, 11)
    ref_w = torch.from_numpy(quants.dequantize(t.data, qtype).reshape(44, 512).astype(np.float32))
    layer = q8_from_ggml([t])
    assert isinstance(layer, Q8Linear) and layer.packed.shape == (6, 16, 304)
    assert_within_fp16_scales(layer.dequantize(), ref_w, *ggml_q8(t))
    x = torch.randn(tokens, 512)
    assert rel_err(layer(x), x @ layer.dequantize().T) < 1e-4


def test_weights_of_mixed_types_fuse_exactly():
    """A Q4_K_M file stores q and k as Q4_K and v as Q6_K: fused into one 8-bit module with offsets and a
    scale per 16, which holds each type exactly (so the block still runs as one op)."""
    from herd.transforms.quantize import can_share_one_module, quantized_linear
    from tests.test_quant import random_ggml

    parts = [random_ggml(GGMLType.Q4_K, 40, 512, 1), random_ggml(GGMLType.Q6_K, 16, 512, 2),
             random_ggml(GGMLType.Q8_0, 8, 512, 3), random_ggml(GGMLType.Q4_1, 8, 512, 4)]
    assert can_share_one_module(parts)
    layer = quantized_linear(parts)
    assert isinstance(layer, Q8Linear) and layer.packed.shape[-1] == 304 and layer.kernel_weights() is not None
    want = torch.cat([torch.from_numpy(quants.dequantize(p.data, Q(p.ggml_type)).reshape(p.shape).astype(np.float32))
                      for p in parts])  # gguf-py's dequantization of each part
    q, d, m = (torch.cat(x) for x in zip(*(ggml_q8x(p) for p in parts)))
    assert_within_fp16_scales(layer.dequantize(), want, q, d, m)
    x = torch.randn(2, 512)
    assert rel_err(layer(x), x @ layer.dequantize().T) < 1e-4


def test_bf16_inputs_and_shapes():
    gguf_w, ref_w = gguf_tensor(Q.Q4_1, np.random.default_rng(0).standard_normal((33, 64)) * 0.1)
    layer = q4_from_ggml([gguf_w])
    x = torch.randn(64)
    assert layer(x).shape == (33,)
    assert rel_err(layer(x.bfloat16()), x.bfloat16().float() @ ref_w.T) < 1e-2
    with pytest.raises(RuntimeError, match="features"):
        layer(torch.randn(1, 32))


def test_fused_weights_stack_outputs():
    rng = np.random.default_rng(1)
    (a, ra), (b, rb) = gguf_tensor(Q.Q4_0, rng.standard_normal((40, 128))), gguf_tensor(Q.Q4_0, rng.standard_normal((24, 128)))
    fused = q4_from_ggml([a, b])
    assert torch.equal(fused.dequantize(), torch.cat([ra, rb]))
    x = torch.randn(1, 128)
    assert torch.allclose(fused(x), torch.cat([q4_from_ggml([a])(x), q4_from_ggml([b])(x)], -1))


def test_herd_int4_groups_as_q4():
    w = torch.randn(48, 256)
    q, scales, zeros = quantize_int4(w, 128)
    deq = ((q.float() - 8) * scales.repeat_interleave(128, 1) + zeros.repeat_interleave(128, 1))
    d = scales.float().repeat_interleave(4, 1)  # w = d*q + m per block of 32, m = zero - 8*scale
    assert_within_fp16_scales(q4_from_int4(q, scales, zeros, 128).dequantize(), deq, q, d,
                              zeros.float().repeat_interleave(4, 1) - 8 * d)


@pytest.mark.parametrize("q4", [True, False])
def test_packed_layout(q4):
    """The documented layout (cpu.cpp's header): records of d[8], m[8] (q4) and the values of 8 rows."""
    n, k = 11, 64
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8) if q4 else torch.randint(-128, 128, (n, k), dtype=torch.int8)
    d, m = torch.rand(n, k // 32), torch.rand(n, k // 32)
    packed = kernels.ops.pack(q, d, m) if q4 else kernels.ops.pack(q, d)
    record = 192 if q4 else 288
    assert packed.shape == (2, 2, record) and packed.dtype == torch.uint8
    rec = packed  # [group, block, record]
    for row, block, j in [(0, 0, 0), (3, 1, 5), (10, 1, 31), (7, 0, 18)]:
        g, r = divmod(row, 8)
        floats = rec[g, block, :64].contiguous().view(torch.float32)
        assert floats[r] == d[row, block]
        if q4:
            assert floats[8 + r] == m[row, block]
            v, s, h = j // 8, (j % 8) // 2, j % 2
            lane = rec[g, block, 64 + 32 * v + 2 * (2 * r + h):][:2]
            assert (int(lane[0]) | int(lane[1]) << 8) >> (4 * s) & 15 == q[row, 32 * block + j]
        else:
            v, hi, h = j // 4, (j % 4) // 2, j % 2
            assert rec[g, block, 32 + 32 * v + 2 * (2 * r + h) + hi].view(torch.int8) == q[row, 32 * block + j]
    assert rec[1, :, 64 if q4 else 32:].reshape(2, 4 if q4 else 8, 16, 2)[:, :, 6:].count_nonzero() == 0  # rows 11-15: padding
    if q4:
        with pytest.raises(RuntimeError, match="0..15"):
            kernels.ops.pack(q | 16, d, m)


@pytest.mark.parametrize("q4", [True, False])
def test_fp16_records_hold_their_scales(q4):
    """q4h (160 bytes) and q8xh (304): d and m stored as fp16, the weight is d*q + m of those."""
    n, k = 11, 64
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8) if q4 else torch.randint(-128, 128, (n, k), dtype=torch.int8)
    d, m = torch.rand(n, k // 32 if q4 else k // 16).half(), torch.rand(n, k // 32).half()
    packed = kernels.ops.pack(q, d, m)
    assert packed.shape == (2, 2, 160 if q4 else 304)
    want = q.float() * d.float().repeat_interleave(k // d.shape[1], 1) + m.float().repeat_interleave(32, 1)
    assert torch.equal(kernels.ops.dequantize(packed, n), want)
    x = torch.randn(3, k)
    assert rel_err(kernels.ops.linear(x, packed, n), x @ want.T) < 1e-4


def test_rms_norm():
    x, w = torch.randn(3, 5, 576) * 3, torch.randn(576)
    torch.testing.assert_close(kernels.ops.rms_norm(x, w, 1e-5), F.rms_norm(x, (576,), w, 1e-5))


@pytest.mark.parametrize("heads,kv_heads,length", [(9, 3, 1), (9, 3, 77), (4, 4, 300)])
def test_decode_attention(heads, kv_heads, length):
    cache_k, cache_v = torch.randn(2, kv_heads, 512, 64), torch.randn(2, kv_heads, 512, 64)
    k, v = cache_k[:, :, :length], cache_v[:, :, :length]  # strided views, as the cache hands them out
    q = torch.randn(2, heads, 1, 64)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=heads != kv_heads)
    torch.testing.assert_close(kernels.ops.decode_attention(q, k, v, 64**-0.5), want, rtol=1e-5, atol=1e-5)


def test_silu_mul():
    x = torch.randn(2, 3, 2 * 1536) * 4
    gate, up = x.chunk(2, -1)
    torch.testing.assert_close(kernels.ops.silu_mul(x), F.silu(gate) * up)


def test_rope_matches_the_complex_rotation():
    from herd.model.rope import apply_rope

    x = torch.randn(2, 7, 12, 64)
    angles = torch.rand(2, 7, 32) * 6
    rot = torch.polar(torch.ones_like(angles), angles).unsqueeze(2)
    want = x.clone()
    want[:, :, :9] = apply_rope(x[:, :, :9], rot)  # q and k heads rotate, v heads do not
    got = x.clone()
    kernels.ops.rope_(got, torch.view_as_real(rot), 9)
    torch.testing.assert_close(got, want)


def test_ops_have_shape_functions_for_tracing():
    """Every op a forward pass calls runs on the meta device (its registered fake), as torch.compile needs."""
    if not kernels.load():
        pytest.skip(f"herd kernels unavailable: {kernels.why_not()}")
    meta = dict(device="meta")
    ops = torch.ops.herd
    x, w = torch.empty(3, 5, 64, **meta), torch.empty(4, 2, 192, dtype=torch.uint8, **meta)  # 32 rows, K = 64
    assert ops.linear(x, w, 30).shape == (3, 5, 30)
    assert ops.dequantize(w).shape == (32, 64)
    assert ops.dequantize_rows(w, torch.empty(7, dtype=torch.long, **meta)).shape == (7, 64)
    assert ops.rms_norm(x, torch.empty(64, **meta), 1e-5).shape == x.shape
    assert ops.silu_mul(x).shape == (3, 5, 32)
    q, k = torch.empty(2, 4, 1, 16, **meta), torch.empty(2, 2, 9, 16, **meta)
    assert ops.decode_attention(q, k, k, 0.25).shape == q.shape
    block = ops.decode_block(torch.empty(2, 1, 64, **meta), torch.empty(64, **meta), torch.empty(64, **meta), [w] * 4,
                             torch.empty(3, 1, 16, 16, **meta), torch.empty(3, 1, 16, 16, **meta),
                             torch.empty(2, 1, 8, 2, **meta), torch.empty(2, dtype=torch.long, **meta),
                             torch.empty(2, 1, dtype=torch.long, **meta), 2, 1, 1e-5, True)
    assert block.shape == (2, 1, 64) and block.device.type == "meta"


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
@pytest.mark.parametrize("tokens", [1, 6, 70])
def test_int8_prompt_activations_are_their_definition(qtype, tokens):
    """prompt_int8's path: activations rounded to int8 per block of 32 (scale amax/127), times the weights the
    layer holds, exactly (integer products); from `int8_tokens` tokens on, and never for fewer."""
    from herd.transforms.prompt_int8 import use_int8_prompts

    rng = np.random.default_rng(tokens)
    gguf_w, _ = gguf_tensor(qtype, rng.standard_normal((70, 96)) * 0.05)
    layer = q4_from_ggml([gguf_w])
    w = layer.dequantize()
    x = torch.randn(tokens, 96)
    blocks = x.view(tokens, -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    want = (torch.round(blocks / d) * d).view(tokens, 96) @ w.T
    got = torch.ops.herd.linear(x, layer.packed, 70, 1)
    assert rel_err(got, want) < 1e-6
    assert rel_err(got, x @ w.T) < 2e-2  # int8 rounding: ~5e-3 typical
    assert use_int8_prompts(torch.nn.Sequential(layer), min_tokens=6) == 1
    exact = rel_err(layer(x), x @ w.T) < 1e-4
    assert exact == (tokens < 6)  # int16 below the threshold
