"""The same weights as an HF directory, a Meta checkpoint and GGUF files: same logits, same fingerprint.

Reference logits come from transformers (tests/fixtures/build.py). Meta checkpoints of Llama 3.1/3.2 are written
from the `meta_compatible` variant of the tiny model (llama3 RoPE with Meta's hard-coded original context 8192,
since params.json cannot say anything else); its weights, and so its fingerprint, are those of the main variant.
"""

import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `herd` and `tests.fixtures`

import pytest
import torch

from tests.fixtures import build as B

TOL = 1e-4  # float32 in every format: only summation order differs
DEQUANT_TOL = 1e-3  # herd on a quantized file vs HF on the very weights that file stores (see test_gguf_quantized)
# Relative RMS error of logits vs the float32 original (observed on these fixtures: F16 <= 0.002; Q8_0 <= 0.04 for
# Llama 1-3 and 0.17-0.20 for Llama 4, where top-1 routing flips on near-tied router logits). Random logits give
# about 1.4, a layout error about 1.
RELRMS_TOL = {"F16": 0.01, "Q8_0": 0.10, "Q8_0-llama4": 0.40}

META_CASES = [(g, n) for g in B.GENERATIONS for n in ((1,) if g in B.LLAMA4 else (1, 2))]

from tests.test_parity_hf import load  # noqa: E402  (one cache of loaded models for both files)


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def hf_fingerprint(gen: str) -> str:
    return load(B.reference(gen).hf_dir).fingerprint


# -- the fixtures themselves (no herd): each written format reads back to exactly the HF weights ----------------


@pytest.mark.parametrize("gen,n_shards", META_CASES)
def test_fixture_meta_reads_back_exactly(gen, n_shards):
    mref = B.reference(gen, meta_compatible=True)
    sd = B.hf_state_dict_from_meta(mref.meta_dir(n_shards), gen)
    ids = B.tokens(gen)
    model = B.model_with_state_dict(gen, sd, meta_compatible=True)
    assert torch.equal(B.hf_logits(model, ids), mref.logits(ids))


@pytest.mark.parametrize("gen", B.GENERATIONS)
def test_fixture_gguf_reads_back_exactly(gen):
    ref = B.reference(gen)
    ids = B.tokens(gen)
    model = B.model_with_state_dict(gen, B.hf_state_dict_from_gguf(ref.gguf("F32"), gen))
    assert torch.equal(B.hf_logits(model, ids), ref.logits(ids))


# -- herd ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gen,n_shards", META_CASES)
def test_meta_checkpoint(gen, n_shards):
    mref = B.reference(gen, meta_compatible=True)
    llm = load(mref.meta_dir(n_shards))
    ids = B.tokens(gen)
    diff = max_diff(llm.logits(ids), mref.logits(ids))
    print(f"{gen} meta x{n_shards}: max|Δ| = {diff:.2e}")
    assert diff < TOL, f"{gen} Meta ({n_shards} shards) vs HF max|Δ| = {diff:.3e}"
    assert llm.fingerprint == hf_fingerprint(gen)


@pytest.mark.parametrize("gen", B.GENERATIONS)
def test_gguf_f32(gen):
    ref = B.reference(gen)
    llm = load(ref.gguf("F32"))
    ids = B.tokens(gen, batch=2)
    diff = max_diff(llm.logits(ids), ref.logits(ids))
    print(f"{gen} gguf F32: max|Δ| = {diff:.2e}")
    assert diff < TOL, f"{gen} GGUF F32 vs HF max|Δ| = {diff:.3e}"
    assert llm.fingerprint == hf_fingerprint(gen)


@pytest.mark.parametrize("dtype", ["F16", "Q8_0"])
@pytest.mark.parametrize("gen", B.GENERATIONS)
def test_gguf_quantized(gen, dtype):
    """Two checks with different references.

    1. Exactness of the decoder: HF run on the weights gguf-py dequantizes from the same file. F16 and Q8_0 decode
       exactly to float32 (fp16 scale times int8), so a correct loader computing in float32 differs only by summation
       order; DEQUANT_TOL leaves room for a different float32 path, not for a layout or block error (those are O(1)).
    2. Closeness to the float32 original, as a relative RMS error: F16 keeps 11 significant bits (about 5e-4 relative
       per weight), Q8_0 8 bits per 32-weight block with an fp16 scale (about 0.5% RMS per weight); these tiny random
       nets amplify weight noise about tenfold, and Llama 4's top-1 router turns some of it into different experts.
    """
    ref = B.reference(gen)
    path = ref.gguf(dtype)
    llm = load(path)
    ids = B.tokens(gen)
    got = llm.logits(ids)
    stored = B.hf_logits(B.model_with_state_dict(gen, B.hf_state_dict_from_gguf(path, gen)), ids)
    exact = max_diff(got, stored)
    want = ref.logits(ids)
    relrms = ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()
    print(f"{gen} gguf {dtype}: max|Δ| vs stored weights = {exact:.2e}, rel. RMS vs float32 HF = {relrms:.4f}")
    assert exact < DEQUANT_TOL, f"{gen} {dtype}: herd vs HF on the file's weights max|Δ| = {exact:.3e}"
    key = f"{dtype}-llama4" if gen in B.LLAMA4 and dtype == "Q8_0" else dtype
    assert relrms < RELRMS_TOL[key]
    fp = llm.fingerprint
    assert re.fullmatch(r"[0-9a-f]{64}", fp) and fp != hf_fingerprint(gen)


# -- architecture facts agree across formats and with the fixture's spec --------------------------------------------


def _facts(cfg) -> dict:
    facts = {k: getattr(cfg, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "head_dim",
                                          "hidden_dim", "norm_eps", "rope_theta", "tie_embeddings")}
    if cfg.is_llama4:
        facts.update(moe=(cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.hidden_dim, tuple(cfg.moe.layers)),
                     nope_layers=tuple(cfg.nope_layers), attention_chunk_size=cfg.attention_chunk_size,
                     use_qk_norm=cfg.use_qk_norm, attn_temperature_tuning=cfg.attn_temperature_tuning,
                     floor_scale=cfg.floor_scale, attn_scale=cfg.attn_scale)
    else:
        facts.update(moe=cfg.moe, nope_layers=tuple(cfg.nope_layers), use_qk_norm=cfg.use_qk_norm)
    return facts


def _expected(gen: str) -> dict:
    s, hfc = B.SPECS[gen], B.reference(gen).model.config
    facts = dict(dim=s.dim, n_layers=s.n_layers, n_heads=s.n_heads, n_kv_heads=s.n_kv_heads, vocab_size=s.vocab,
                 head_dim=s.head_dim, norm_eps=s.norm_eps, rope_theta=s.rope_theta, tie_embeddings=s.tied,
                 hidden_dim=hfc.intermediate_size_mlp if gen in B.LLAMA4 else hfc.intermediate_size)
    if gen in B.LLAMA4:
        facts.update(moe=(s.n_experts, s.top_k, hfc.intermediate_size, tuple(range(s.moe_step - 1, s.n_layers, s.moe_step))),
                     nope_layers=tuple(i for i in range(s.n_layers) if (i + 1) % s.nope_interval == 0),
                     attention_chunk_size=s.chunk, use_qk_norm=s.qk_norm, attn_temperature_tuning=s.temperature_tuning,
                     floor_scale=s.floor_scale, attn_scale=s.attn_scale)
    else:
        facts.update(moe=None, nope_layers=(), use_qk_norm=False)
    return facts


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):  # GGUF stores eps/theta as float32
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


@pytest.mark.parametrize("gen", B.GENERATIONS)
def test_config_agrees_across_formats(gen):
    want = _expected(gen)
    sources = {"hf": B.reference(gen).hf_dir, "meta": B.reference(gen, meta_compatible=True).meta_dir(1),
               "gguf": B.reference(gen).gguf("F32")}
    for fmt, path in sources.items():
        got = _facts(load(path).config)
        bad = {k: (got[k], v) for k, v in want.items() if not _same(got[k], v)}
        assert not bad, f"{gen} {fmt}: (herd, expected) {bad}"
