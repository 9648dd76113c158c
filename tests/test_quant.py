"""Weights kept quantized (issue 5): exact repacking of GGML blocks, `herd quantize`, and the quality of the
quantized bf16 path on the real SmolLM2 model against herd's own exact fp32 dequantized path."""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `herd` and `tests.fixtures`

import numpy as np
import pytest
import torch

import herd
from herd.errors import HerdError
from herd.quant import GGMLTensor, Int4Weight, Int8Weight
from herd.quant.ggml import BLOCK_SIZES, GGMLType
from herd import kernels
from herd.quant.linear import (BF16Linear, Int4Linear, Int8Linear, Q4Linear, Q8Linear, QuantEmbedding, dequantize_bf16,
                               int4_from_ggml, pack_nibbles, quantize_int4)
from tests.fixtures import build as B

# byte offsets of the fp16 scale fields in each block (random bytes there could be inf/nan)
_SCALES = {GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q4_K: (0, 2), GGMLType.Q8_0: (0,),
           GGMLType.Q5_0: (0,), GGMLType.Q5_1: (0, 2), GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,)}


def random_ggml(type_: GGMLType, n: int, k: int, seed: int = 0) -> GGMLTensor:
    """Every bit pattern of the quants, sane scales: a GGML tensor as a file would hold it."""
    rng = np.random.default_rng(seed)
    block, size = BLOCK_SIZES[type_]
    blocks = rng.integers(0, 256, (n * k // block, size), dtype=np.uint8)
    for at in _SCALES[type_]:
        blocks[:, at : at + 2] = (rng.standard_normal((len(blocks), 1)) * 0.05).astype(np.float16).view(np.uint8)
    return GGMLTensor(int(type_), (n, k), blocks.reshape(-1), f"random {type_.name}")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("type_", [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K, GGMLType.Q8_0])
def test_int4_repacking_is_the_ggml_dequantization(type_):
    """The packed int4 matmul equals x @ dequantize(W)^T up to bf16 rounding (scales, activations, output),
    on row counts that are not a multiple of the packing block; fusing weights stacks their outputs exactly."""
    w1, w2 = random_ggml(type_, 200, 512, 1), random_ggml(type_, 72, 512, 2)
    x = torch.randn(5, 512)
    want = x.bfloat16().float() @ w1.dequantize().T
    single = int4_from_ggml([w1])
    assert isinstance(single, Int4Linear) and single.split == (2 if type_ == GGMLType.Q8_0 else 1)
    got = single(x)
    assert got.dtype == torch.bfloat16 and got.shape == (5, 200)
    assert rel_err(got, want) < 4e-3
    fused = int4_from_ggml([w1, w2])(x)
    assert torch.equal(fused[:, :200], got)
    assert rel_err(fused[:, 200:], x.bfloat16().float() @ w2.dequantize().T) < 4e-3
    assert tuple(single(x[None, :2]).shape) == (1, 2, 200)  # [B, T, K] in, [B, T, N] out


def test_bf16_fallback_is_the_dequantization():
    a, b = random_ggml(GGMLType.Q6_K, 40, 512, 4), random_ggml(GGMLType.Q6_K, 24, 512, 5)
    want = torch.cat([a.dequantize(), b.dequantize()]).bfloat16()
    assert torch.equal(dequantize_bf16([a, b]), want)


@pytest.mark.parametrize("type_", [GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K])
def test_quant_embedding_dequantizes_the_picked_rows(type_):
    t = random_ggml(type_, 64, 256, 3)
    emb = QuantEmbedding(t, torch.float32)
    tokens = torch.tensor([[5, 0, 63], [7, 7, 1]])
    assert torch.equal(emb(tokens), t.dequantize()[tokens])
    assert emb.weight.dtype == torch.float32 and emb.weight.numel() == 0


def test_int4_quantizer_round_trips_through_the_kernel():
    w = torch.randn(96, 256)
    q, scales, zeros = quantize_int4(w, 32)
    stored = Int4Weight(pack_nibbles(q), scales, zeros, 32)
    deq = stored.dequantize()
    assert rel_err(deq, w) < 0.1  # 16 levels per group of 32
    assert torch.equal(stored.values(), q)
    from herd.quant.linear import pack_int4

    x = torch.randn(3, 256)
    assert rel_err(pack_int4([(q, scales.float(), zeros.float())])(x), x.bfloat16().float() @ deq.T) < 4e-3


# ---- loading choices ---------------------------------------------------------------------------------------


def test_defaults_keep_quantized_files_quantized(smollm2_path, smollm2, smollm2_q):
    model = smollm2_q.model
    if kernels.load():  # herd's kernels: Q4_1 and the tied Q8_0 output stay in their GGML blocks
        assert isinstance(model.layers[0].attention.wqkv, Q4Linear)  # fused q/k/v
        assert isinstance(model.layers[0].feed_forward.w13, Q4Linear)  # fused gate/up
        assert isinstance(model.output, Q8Linear)
    else:  # PyTorch's int4 kernel; the Q8_0 output as bf16 (faster than two int4 planes), top logits refined
        assert isinstance(model.layers[0].attention.wqkv, Int4Linear)
        assert isinstance(model.layers[0].feed_forward.w13, Int4Linear)
        assert isinstance(model.output.linear, BF16Linear)
        assert model.output.rows is model.tok_embeddings  # refined in fp32 from the same stored rows
    assert isinstance(model.tok_embeddings, QuantEmbedding)
    assert model.tok_embeddings.weight.dtype == torch.float32  # residual stream, attention and KV cache in fp32
    # float32 keeps the exact dequantized path (what the parity tests use)
    assert isinstance(smollm2.model.layers[0].attention.wq, torch.nn.Linear)
    assert not hasattr(smollm2.model.layers[0].attention, "wqkv")  # the plain model's separate q, k, v
    assert smollm2.model.output.weight.dtype == torch.float32
    assert smollm2_q.fingerprint == smollm2.fingerprint  # the same stored weights
    with pytest.raises(HerdError, match="bfloat16"):
        herd.load(smollm2_path, dtype="float32", quantized=True)


def test_threads_default_to_physical_cores():
    from herd.runtime import physical_cores, set_threads

    before = torch.get_num_threads()
    try:
        assert set_threads() == physical_cores() >= 1
        assert torch.get_num_threads() == physical_cores()
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ---- herd quantize -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["q4", "q8"])
@pytest.mark.parametrize("gen", ["llama2_gqa", "llama3_2"])
def test_herd_quantize_round_trip(tmp_path, gen, scheme):
    """HF checkpoint → `herd quantize` → a directory herd loads quantized; its logits are the exact fp32
    dequantization of what was stored (to bf16 precision), and close to the unquantized model."""
    from safetensors import safe_open

    from herd.cli import main

    ref = B.reference(gen)
    out = tmp_path / scheme
    assert main(["quantize", str(ref.hf_dir), "--to", scheme, str(out)]) in (0, None)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    suffix = ".q4" if scheme == "q4" else ".q8"
    assert f"layers.0.attention.wq.weight{suffix}" in keys and "layers.0.attention_norm.weight" in keys
    assert f"tok_embeddings.weight{suffix}" in keys

    llm = herd.load(out)
    if kernels.load():
        kind = Q4Linear if scheme == "q4" else Q8Linear
        output = llm.model.output
    else:
        kind = Int4Linear if scheme == "q4" else Int8Linear
        output = llm.model.output.linear
    assert isinstance(llm.model.layers[0].attention.wqkv, kind) and isinstance(output, kind)
    stored = llm.checkpoint.tensors["layers.0.attention.wq.weight"]
    assert isinstance(stored, Int4Weight if scheme == "q4" else Int8Weight)
    ids = B.tokens(gen)
    got = llm.logits(ids.tolist())
    exact = herd.load(out, dtype="float32").logits(ids.tolist())
    assert rel_err(got, exact) < 0.02  # bf16 activations on the same stored weights
    # the quantization itself: every stored weight is close to the source's; q8 logits stay close too
    # (tiny random models amplify 4-bit noise through their logits, so q4 is judged on the weights)
    from herd.formats import open_checkpoint

    source = open_checkpoint(ref.hf_dir).tensors
    for name, t in llm.checkpoint.tensors.items():
        if isinstance(t, (Int4Weight, Int8Weight)):
            assert rel_err(t.dequantize(), source[name]) < (0.1 if scheme == "q4" else 0.01), name
    if scheme == "q8":
        assert rel_err(exact, ref.logits(ids)) < 0.05


def test_herd_quantize_meta_checkpoint(tmp_path):
    from herd.formats import open_checkpoint
    from herd.formats.herdq import write_herdq

    mref = B.reference("llama3_1", meta_compatible=True)
    out = write_herdq(open_checkpoint(mref.meta_dir(1)), tmp_path / "q8", "q8")
    ids = B.tokens("llama3_1")
    assert rel_err(herd.load(out, dtype="float32").logits(ids.tolist()), mref.logits(ids)) < 0.05


# ---- the real model: quality of the quantized path --------------------------------------------------------

SHAKESPEARE = Path(__file__).parent / "data" / "tinyshakespeare-40k.txt"  # see tests/data/README.md


@pytest.fixture(scope="module")
def shakespeare_ids(smollm2):
    text = SHAKESPEARE.read_text(encoding="utf-8")
    return smollm2.tokenizer.encode(text)


def test_quantized_top1_agreement_and_perplexity(smollm2, smollm2_q, shakespeare_ids):
    """Next-token top-1 agreement with the fp32 dequantized path ≥ 98% over 512 tokens, and perplexity on
    tiny Shakespeare (4 windows of 512 tokens) within 1% of the fp32 path's."""
    windows = [shakespeare_ids[i * 512 : (i + 1) * 512] for i in range(4)]
    nll = {"fp32": 0.0, "q": 0.0}
    agree = []
    for w in windows:
        target = torch.tensor(w[1:])
        for key, llm in (("fp32", smollm2), ("q", smollm2_q)):
            logits = llm.logits(w)[:-1].float()
            nll[key] += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            if key == "fp32":
                ref_top = logits.argmax(-1)
            else:
                agree.append((logits.argmax(-1) == ref_top).float().mean().item())
    n = sum(len(w) - 1 for w in windows)
    ppl = {k: math.exp(v / n) for k, v in nll.items()}
    print(f"top-1 agreement (first 512 tokens) {agree[0]:.4f}, all windows {np.mean(agree):.4f}; "
          f"perplexity fp32 {ppl['fp32']:.3f}, quantized {ppl['q']:.3f} ({ppl['q'] / ppl['fp32'] - 1:+.2%})")
    assert agree[0] >= 0.98
    assert abs(ppl["q"] / ppl["fp32"] - 1) <= 0.01


def test_quantized_decode_equals_full_forward(smollm2_q):
    """KV-cache decode on the quantized path matches one full forward (bf16 tolerance), including the
    engine's calling convention (a paged cache, blocks in no particular order)."""
    from herd.model import Batch, PagedKVCache

    llm = smollm2_q
    ids = llm.tokenizer.encode("The three primary colours are red, yellow and")
    out = llm.generate(ids, max_tokens=8, temperature=0, logprobs=0, stop_token_ids=[])
    full = torch.log_softmax(llm.logits(ids + out.token_ids[:-1]).float(), -1)[len(ids) - 1 :]
    for i, lp in enumerate(out.logprobs):
        assert lp.token_id == int(full[i].argmax()) or full[i].topk(2).values.diff().abs().item() < 0.05
        assert abs(lp.logprob - full[i, lp.token_id].item()) < 0.05
    model = llm.model
    cache = PagedKVCache.for_model(llm.config, 64, block_size=4, dtype=model.tok_embeddings.weight.dtype)
    table = [list(range(cache.num_blocks - 1, 0, -1))]  # the last block first
    tokens = torch.tensor([ids])
    with torch.inference_mode():
        model(tokens, Batch.rows(cache, table, [0], len(ids)))
        step = model(torch.tensor([[out.token_ids[0]]]), Batch.rows(cache, table, [len(ids)], 1), last_only=True)
    assert rel_err(torch.log_softmax(step[0, -1], -1), full[1]) < 0.02


def _decode_logits(llm, ids, *more, kv_dtype=torch.float32):
    """Logits for ids fed one token per forward through the KV cache: the decode path generation runs (with
    herd's kernels: quantized activations, one C++ op per block), not the prompt's float GEMMs. With
    `more` sequences of the same length, all rows step together (a batch): [rows, T, vocab]. `lag`: row r
    starts r * lag steps after row 0 (rows at different positions in one step)."""
    from herd.model import Batch, PagedKVCache

    rows = [ids, *more]
    per_row = -(-len(ids) // 16)
    cache = PagedKVCache.for_model(llm.config, 16 * per_row * len(rows), block_size=16, dtype=kv_dtype)
    tables = [[1 + r + len(rows) * b for b in range(per_row)] for r in range(len(rows))]  # rows' blocks interleaved
    with torch.inference_mode():
        steps = [llm.model(torch.tensor([[r[i]] for r in rows]), Batch.rows(cache, tables, [i] * len(rows), 1))[:, 0]
                 for i in range(len(ids))]
    return torch.stack(steps, 1) if more else torch.stack(steps, 1)[0]


def _staggered_decode_logits(llm, a, b, lag):
    """Rows a and b decoded one token a step in the same forwards, b starting `lag` steps later, so that
    each step's rows sit at different positions: (logits of a, logits of b)."""
    from herd.model import Batch, PagedKVCache

    cache = PagedKVCache.for_model(llm.config, 2 * (len(a) + lag), block_size=16)
    tables = [list(range(1, cache.num_blocks, 2)), list(range(2, cache.num_blocks, 2))]
    out = {0: [], 1: []}
    with torch.inference_mode():
        for step in range(max(len(a), len(b) + lag)):
            rows = [(r, p) for r, p in ((0, step), (1, step - lag)) if 0 <= p < len((a, b)[r])]
            tokens = torch.tensor([[(a, b)[r][p]] for r, p in rows])
            logits = llm.model(tokens, Batch.rows(cache, [tables[r] for r, _ in rows], [p for _, p in rows], 1))[:, 0]
            for (r, _), row in zip(rows, logits):
                out[r].append(row)
    return torch.stack(out[0]), torch.stack(out[1])


def test_quantized_decode_path_agreement_and_perplexity(smollm2, smollm2_q, shakespeare_ids):
    """The same targets on the token-by-token decode path: top-1 ≥ 98%, perplexity within 1%."""
    ids = shakespeare_ids[:512]
    ref = smollm2.logits(ids)[:-1].float()
    got = _decode_logits(smollm2_q, ids)[:-1].float()
    target = torch.tensor(ids[1:])
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    ppl_ref, ppl = (math.exp(torch.nn.functional.cross_entropy(x, target).item()) for x in (ref, got))
    print(f"decode path: top-1 agreement {agree:.4f}, perplexity fp32 {ppl_ref:.3f}, quantized {ppl:.3f}")
    assert agree >= 0.98
    assert abs(ppl / ppl_ref - 1) <= 0.01


def test_one_op_decode_block_is_the_block(smollm2_q, shakespeare_ids, monkeypatch):
    """herd::decode_block computes what TransformerBlock.forward computes op by op."""
    import herd.transforms.cpu_kernels as cpu_kernels

    if not kernels.load():
        pytest.skip(f"herd kernels unavailable: {kernels.why_not()}")
    ids = shakespeare_ids[:48]
    fused, fused_batch = _decode_logits(smollm2_q, ids), _decode_logits(smollm2_q, ids[:24], ids[24:])
    monkeypatch.setattr(cpu_kernels, "ONE_OP_DECODE", False)
    torch.testing.assert_close(fused, _decode_logits(smollm2_q, ids), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused_batch, _decode_logits(smollm2_q, ids[:24], ids[24:]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused_batch[0], fused[:24], rtol=1e-4, atol=1e-4)  # rows do not mix
    monkeypatch.setattr(cpu_kernels, "ONE_OP_DECODE", True)
    got_a, got_b = _staggered_decode_logits(smollm2_q, ids[:24], ids[24:], lag=7)  # rows at different positions
    torch.testing.assert_close(got_a, fused[:24], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_b, _decode_logits(smollm2_q, ids[24:]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float16])
def test_one_op_decode_reads_16_bit_keys_as_the_block_does(smollm2_q, shakespeare_ids, monkeypatch, kv_dtype):
    """With a 16-bit KV cache herd::decode_block widens keys and values exactly as TransformerBlock.forward's
    cache read does (the same stored values), so the two paths agree as closely as with fp32 keys."""
    import herd.transforms.cpu_kernels as cpu_kernels

    if not kernels.load():
        pytest.skip(f"herd kernels unavailable: {kernels.why_not()}")
    ids = shakespeare_ids[:40]
    fused = _decode_logits(smollm2_q, ids[:20], ids[20:], kv_dtype=kv_dtype)
    monkeypatch.setattr(cpu_kernels, "ONE_OP_DECODE", False)
    torch.testing.assert_close(fused, _decode_logits(smollm2_q, ids[:20], ids[20:], kv_dtype=kv_dtype),
                               rtol=1e-4, atol=1e-4)
