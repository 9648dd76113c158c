"""Hostile and malformed files (issue 11, items 2, 6, 7, 8): each fails fast with a herd error that names the
file and the field, or, where the file is legitimate, loads and generates safely.

Sources: the real SmolLM2 GGUF with its header rewritten (tests/fixtures/build.py: write_gguf_variant keeps the
tensor data), and the tiny HF / Meta / GGUF Llama 3 fixtures, copied and damaged in a temporary folder.
"""

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `herd` and `tests.fixtures`

import pytest
import torch
from safetensors.torch import load_file, save_file

import herd
from herd import errors
from herd.config import ModelArgs, MoEArgs, RopeScaling
from tests.fixtures import build as B

GEN = "llama3"
ROOT = Path(__file__).resolve().parents[1]
U32, I32, F32, U64, STR, ARR = 4, 5, 6, 10, B.GGUF_STRING, B.GGUF_ARRAY


@pytest.fixture(scope="module")
def smollm2_header(smollm2_path) -> B.GGUFHeader:
    return B.read_gguf_header(smollm2_path)


@pytest.fixture(scope="module")
def tiny_gguf_header() -> B.GGUFHeader:
    return B.read_gguf_header(B.reference(GEN).gguf("F32"))


def gguf_variant(header: B.GGUFHeader, tmp_path, **kv) -> Path:
    """A copy of the header's file with metadata keys set to (type, value), or removed where None."""
    h = header.copy()
    for key, value in kv.items():
        key = key.replace("__", ".")
        if value is None:
            h.kv.pop(key, None)
        else:
            h.kv[key] = value
    return B.write_gguf_variant(h, tmp_path / "variant.gguf")


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data = change(data) or data
    path.write_text(json.dumps(data, indent=2))


def raises(exc, source, *words, **load_kwargs):
    """herd.load(source) raises exc (a herd error); its message contains every word (case-insensitive)."""
    with pytest.raises(exc) as info:
        herd.load(str(source), device="cpu", **load_kwargs)
    assert isinstance(info.value, errors.HerdError), f"bare {type(info.value).__name__}: {info.value}"
    msg = str(info.value).lower()
    missing = [w for w in words if str(w).lower() not in msg]
    assert not missing, f"message {str(info.value)!r} does not mention {missing}"
    return info.value


def load_in_child(path: Path, timeout: float = 60) -> dict:
    """herd.load in a fresh interpreter (a load that hangs cannot hang the suite): the error's class and
    message, and the peak RSS of the process."""
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ROOT)!r})
        import herd
        try:
            herd.load({str(path)!r}, device="cpu")
            out = {{"error": None}}
        except BaseException as e:
            out = {{"error": type(e).__name__, "herd": isinstance(e, herd.errors.HerdError), "message": str(e)}}
        # VmHWM: this process's own peak (ru_maxrss would start from the forking parent's RSS)
        hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        out["rss_mb"] = int(hwm.split()[1]) / 1024
        print(json.dumps(out))
    """)
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading {path.name} did not finish within {timeout} s")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_fast_herd_error(result: dict, *words, rss_mb: float = 2000):
    """A herd error naming the field, raised before anything sized by the bad value exists: the peak memory
    stays far below what a billion layers (or a 2^31-wide head) would take, and the child's deadline
    (load_in_child) catches a loop over them. (No wall-clock bound: speed is benchmarks/' business, and a
    shared machine makes seconds meaningless.)"""
    assert result["error"] is not None, "the load succeeded"
    assert result["herd"], f"bare {result['error']}: {result['message']}"
    assert result["rss_mb"] < rss_mb, f"peak RSS {result['rss_mb']:.0f} MB (bound {rss_mb} MB)"
    missing = [w for w in words if w.lower() not in result["message"].lower()]
    assert not missing, f"message {result['message']!r} does not mention {missing}"


# -- 2. a layer count (or a size) in the header that the tensors do not back -------------------------------------


@pytest.mark.parametrize("blocks", [20000, 200000, 2**31 - 1])
def test_gguf_block_count_fails_before_allocating(smollm2_header, tmp_path, blocks):
    path = gguf_variant(smollm2_header, tmp_path, llama__block_count=(U32, blocks))
    result = load_in_child(path)
    assert_fast_herd_error(result, "llama.block_count", str(blocks), path.name)
    assert result["error"] == "MissingTensor"


def test_gguf_head_size_fails_before_allocating(smollm2_header, tmp_path):
    """A 2^31-wide head: checked against attn_q's rows before anything sized by it (the RoPE table) exists."""
    path = gguf_variant(smollm2_header, tmp_path, llama__rope__dimension_count=(U32, 2**31))
    result = load_in_child(path)
    assert_fast_herd_error(result, "attention.wq", path.name)
    assert result["error"] == "ShapeMismatch"


@pytest.mark.parametrize("width", [2**64, 2**70])
def test_hf_ffn_width_beyond_the_tensors(hf_dir, width):
    """Found by the fuzzer: 2^64 reached torch's Linear on the meta device and raised a bare TypeError."""
    edit_json(hf_dir / "config.json", _set("intermediate_size", width))
    raises(errors.ShapeMismatch, hf_dir, "feed_forward.w1", str(width))


def test_gguf_ffn_width_beyond_the_tensors(tiny_gguf_header, tmp_path):
    path = gguf_variant(tiny_gguf_header, tmp_path, llama__feed_forward_length=(U64, 2**63))
    raises(errors.ShapeMismatch, path, path.name, "feed_forward.w1", str(2**63))


@pytest.mark.parametrize("gen", [GEN, "llama4_scout"])
def test_hf_num_hidden_layers_fails_before_allocating(tmp_path, gen):
    d = tmp_path / "hf"
    shutil.copytree(B.reference(gen).hf_dir, d)

    def change(cfg):
        (cfg.get("text_config") or cfg)["num_hidden_layers"] = 1_000_000_000
    edit_json(d / "config.json", change)
    assert_fast_herd_error(load_in_child(d), "num_hidden_layers", "1000000000", "config.json")


def test_meta_n_layers_fails_before_allocating(meta_dir):
    edit_json(meta_dir / "params.json", lambda p: p.update(n_layers=1_000_000_000))
    assert_fast_herd_error(load_in_child(meta_dir), "n_layers", "1000000000", "params.json")


def test_gguf_fewer_blocks_than_tensors(smollm2_header, tmp_path):
    path = gguf_variant(smollm2_header, tmp_path, llama__block_count=(U32, 29))
    raises(errors.UnexpectedTensor, path, "llama.block_count", "blk.29")


# -- 6. the vocabulary against the embedding ----------------------------------------------------------------------


def test_gguf_vocabulary_shorter_than_embedding(smollm2_header, tmp_path):
    """llama.cpp sizes token_embd by the token list and refuses any other shape; herd refuses it at load
    (before: it loaded, and generate died with an IndexError decoding an id the vocabulary lacks)."""
    path = B.write_gguf_variant(B.trim_gguf_vocab(smollm2_header, 1000), tmp_path / "trimmed.gguf")
    raises(errors.ShapeMismatch, path, path.name, "tokenizer.ggml.tokens", "1000", "49152")


def test_hf_tokenizer_larger_than_embedding(hf_dir):
    B.write_hf_tokenizer(hf_dir, B.SPECS[GEN].vocab + 100)
    raises(errors.ShapeMismatch, hf_dir, str(B.SPECS[GEN].vocab + 100), str(B.SPECS[GEN].vocab), "tokenizer")


def test_hf_tokenizer_smaller_than_embedding_generates(hf_dir):
    """Padding rows (an embedding larger than the tokenizer) are common in HF checkpoints: they load, ids no
    token stands for are never sampled (nor shown among logprob alternatives), and LLM.logits still returns
    every row's logit as transformers computes it (the ban is the sampler's, not the model's)."""
    n = 100
    B.write_hf_tokenizer(hf_dir, n)
    llm = herd.load(str(hf_dir), device="cpu", dtype="float32")
    assert llm.config.vocab_size == B.SPECS[GEN].vocab > n
    for seed in range(4):
        out = llm.generate("t5 t6 t7", max_tokens=24, temperature=1.5, seed=seed, logprobs=5)
        assert out.completion_tokens > 0 and all(0 <= i < n for i in out.token_ids), out.token_ids
        assert all(0 <= t[0] < n for lp in out.logprobs for t in lp.top), out.logprobs
    greedy = llm.generate("t5", max_tokens=8, temperature=0)
    assert all(i < n for i in greedy.token_ids)
    ids = torch.tensor([[0, 5, 6]])
    want = B.hf_logits(B.reference(GEN).model, ids)[0]
    logits = llm.logits(ids[0])
    assert torch.isfinite(logits).all() and (logits - want).abs().max() < 1e-4
    assert int(logits[-1].argmax()) >= n  # a padding row would win: the greedy ban above was not vacuous


# -- 7. malformed fields: herd errors naming the file and the field, never bare Python errors -----------------------


@pytest.mark.parametrize("key, value, field", [
    ("tokenizer.ggml.bos_token_id", (STR, "1"), "bos_token_id"),
    ("tokenizer.ggml.token_type", (ARR, (STR, ["normal"] * B.SPECS[GEN].vocab)), "token_type"),
    ("tokenizer.ggml.merges", (ARR, (I32, [1, 2, 3])), "merges"),
    ("tokenizer.ggml.add_bos_token", (STR, "yes"), "add_bos_token"),
])
def test_gguf_tokenizer_fields(tiny_gguf_header, tmp_path, key, value, field):
    path = gguf_variant(tiny_gguf_header, tmp_path, **{key.replace(".", "__"): value})
    raises(errors.FormatError, path, path.name, field)


def _hf_config(change):
    return lambda d: edit_json(d / "config.json", change)


def _set(key, value):
    return lambda data: data.update({key: value})


def _rename_tensor(old, new):
    def change(d):
        sd = load_file(d / "model.safetensors")
        sd[new] = sd.pop(old)
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return change


def _q_rows(rows):
    def change(d):
        sd = load_file(d / "model.safetensors")
        name = "model.layers.0.self_attn.q_proj.weight"
        sd[name] = sd[name][:rows].contiguous()
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return change


HF_CASES = {  # id -> (damage, error class, words the message must hold)
    "hidden_size string": (_hf_config(_set("hidden_size", "sixty-four")), errors.ConfigError,
                           ["config.json", "hidden_size", "sixty-four"]),
    "config is a list": (_hf_config(lambda cfg: [cfg]), errors.ConfigError, ["config.json", "array"]),
    "rope_scaling list": (_hf_config(_set("rope_scaling", [1, 2])), errors.ConfigError, ["config.json", "rope_scaling"]),
    "rope_theta string": (_hf_config(lambda cfg: cfg["rope_parameters"].update(rope_theta="big")), errors.ConfigError,
                          ["config.json", "rope_theta"]),
    "head_dim string": (_hf_config(_set("head_dim", "16")), errors.ConfigError, ["config.json", "head_dim"]),
    "generation_config list": (lambda d: (d / "generation_config.json").write_text("[2]"), errors.ConfigError,
                               ["generation_config.json"]),
    "generation eos string": (lambda d: (d / "generation_config.json").write_text('{"eos_token_id": "x"}'),
                              errors.ConfigError, ["generation_config.json", "eos_token_id"]),
    "tensor model.layers.0": (_rename_tensor("model.norm.weight", "model.layers.0"), errors.UnexpectedTensor,
                              ["model.safetensors", "model.layers.0"]),
    "q_proj 63 rows": (_q_rows(63), errors.ShapeMismatch, ["model.safetensors", "q_proj", "63"]),
    "chat_template list": (lambda d: edit_json(d / "tokenizer_config.json", _set("chat_template", [1, 2])),
                           errors.FormatError, ["tokenizer_config.json", "chat_template"]),
    "chat_template number": (lambda d: edit_json(d / "tokenizer_config.json", _set("chat_template", 7)),
                             errors.FormatError, ["tokenizer_config.json", "chat_template"]),
    "tokenizer_config list": (lambda d: (d / "tokenizer_config.json").write_text("[]"), errors.FormatError,
                              ["tokenizer_config.json"]),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_malformed(hf_dir, case):
    damage, exc, words = HF_CASES[case]
    damage(hf_dir)
    raises(exc, hf_dir, *words)


@pytest.fixture
def sharded_dir(tmp_path) -> Path:
    d = tmp_path / "sharded"
    shutil.copytree(B.reference(GEN).sharded_dir(), d)
    return d


@pytest.mark.parametrize("damage, words", [
    (lambda index: [index], ["model.safetensors.index.json", "array"]),
    (lambda index: index.update(weight_map=list(index["weight_map"])), ["model.safetensors.index.json", "weight_map"]),
    (lambda index: index["weight_map"].update({"model.norm.weight": 3}), ["model.safetensors.index.json", "weight_map"]),
    (lambda index: index["weight_map"].update({"model.norm.weight": "../x.safetensors"}),
     ["model.safetensors.index.json", "weight_map"]),
], ids=["index list", "weight_map list", "weight_map value", "weight_map path"])
def test_hf_index_malformed(sharded_dir, damage, words):
    edit_json(sharded_dir / "model.safetensors.index.json", damage)
    raises(errors.FormatError, sharded_dir, *words)


@pytest.mark.parametrize("damage, words", [
    (lambda p: p.update(dim="abc"), ["params.json", "dim", "abc"]),
    (lambda p: p.update(n_heads=4.5), ["params.json", "n_heads"]),
    (lambda p: p.update(norm_eps="tiny"), ["params.json", "norm_eps"]),
    (lambda p: [p], ["params.json", "array"]),
], ids=["dim string", "n_heads fraction", "norm_eps string", "params list"])
def test_meta_malformed(meta_dir, damage, words):
    edit_json(meta_dir / "params.json", damage)
    raises(errors.ConfigError, meta_dir, *words)


# -- safetensors: say what is actually wrong ----------------------------------------------------------------------


def test_safetensors_header_not_json(hf_dir):
    path = hf_dir / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[8:12] = b"{@@@"  # the length still fits: only the JSON is broken
    path.write_bytes(bytes(raw))
    err = raises(errors.FormatError, hf_dir, "model.safetensors", "not valid JSON")
    assert not isinstance(err, errors.TruncatedFile)


def test_safetensors_overlapping_tensors(hf_dir):
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"

    def change(header):
        header[b]["data_offsets"] = list(header[a]["data_offsets"])
    B.rewrite_safetensors_header(hf_dir / "model.safetensors", change)
    err = raises(errors.FormatError, hf_dir, "model.safetensors", "overlap", a, b)
    assert not isinstance(err, errors.TruncatedFile)


def test_safetensors_false_shape(hf_dir):
    name = "model.layers.1.self_attn.v_proj.weight"

    def change(header):
        header[name]["shape"] = [header[name]["shape"][0], header[name]["shape"][1] + 1]
    B.rewrite_safetensors_header(hf_dir / "model.safetensors", change)
    err = raises(errors.FormatError, hf_dir, "model.safetensors", name, "declares", "bytes")
    assert not isinstance(err, errors.TruncatedFile)


def test_safetensors_data_ends_early(hf_dir):
    path = hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    raises(errors.TruncatedFile, hf_dir, "model.safetensors", "data ends before tensor")


# -- 8. values that would compute garbage ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
def test_gguf_rope_freq_base(tiny_gguf_header, tmp_path, value):
    path = gguf_variant(tiny_gguf_header, tmp_path, llama__rope__freq_base=(F32, value))
    raises(errors.ConfigError, path, path.name, "llama.rope.freq_base", "rope_theta")


@pytest.mark.parametrize("key, value, field", [
    ("llama.attention.layer_norm_rms_epsilon", (F32, math.nan), "layer_norm_rms_epsilon"),
    ("llama.attention.layer_norm_rms_epsilon", (F32, 0.0), "layer_norm_rms_epsilon"),
    ("llama.attention.head_count_kv", (U32, 3), "head_count_kv"),  # 4 heads
    ("llama.attention.head_count", (U32, 0), "head_count"),
])
def test_gguf_impossible_numbers(tiny_gguf_header, tmp_path, key, value, field):
    path = gguf_variant(tiny_gguf_header, tmp_path, **{key.replace(".", "__"): value})
    raises(errors.ConfigError, path, path.name, field)


@pytest.mark.parametrize("rope, word", [
    ({"rope_type": "llama3", "rope_theta": 5e5, "factor": 0.0, "original_max_position_embeddings": 64}, "factor"),
    ({"rope_type": "llama3", "rope_theta": 5e5, "factor": math.nan, "original_max_position_embeddings": 64}, "factor"),
    ({"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
      "original_max_position_embeddings": 64}, "high_freq_factor"),
    ({"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "original_max_position_embeddings": 0}, "original"),
    ({"rope_type": "linear", "rope_theta": 5e5, "factor": -2.0}, "factor"),
    ({"rope_type": "default", "rope_theta": 0}, "rope_theta"),
], ids=["factor 0", "factor NaN", "high below low", "original 0", "linear negative", "theta 0"])
def test_hf_rope_values(hf_dir, rope, word):
    edit_json(hf_dir / "config.json", _set("rope_parameters", rope))
    raises(errors.ConfigError, hf_dir, "config.json", word)


def test_hf_heads_do_not_divide(hf_dir):
    edit_json(hf_dir / "config.json", _set("num_key_value_heads", 3))
    raises(errors.ConfigError, hf_dir, "config.json", "num_key_value_heads")


BASE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=96, norm_eps=1e-5,
            rope_theta=10000.0, max_seq_len=64)


@pytest.mark.parametrize("change", [
    dict(rope_theta=0.0), dict(rope_theta=-1.0), dict(rope_theta=math.nan), dict(rope_theta=math.inf),
    dict(head_dim="16"), dict(head_dim=0), dict(n_layers=True),
    dict(floor_scale=0.0), dict(attn_scale=math.nan), dict(attention_chunk_size=-8),
    dict(rope_scaling=RopeScaling("divisors", divisors=(1.0,) * 7)),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_model_args_refuses(change):
    with pytest.raises(errors.ConfigError):
        ModelArgs(**{**BASE, **change})


@pytest.mark.parametrize("kind, kwargs", [
    ("linear", dict(factor=0.0)), ("linear", dict(factor=math.nan)), ("llama3", dict(factor=-8.0)),
    ("llama3", dict(factor=8.0, low_freq_factor=0.0)), ("llama3", dict(factor=8.0, high_freq_factor=math.inf)),
    ("llama3", dict(factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0)), ("divisors", dict(divisors=(1.0, 0.0))),
    ("divisors", dict(divisors=(1.0, math.nan))),
])
def test_rope_scaling_refuses(kind, kwargs):
    with pytest.raises(errors.ConfigError):
        RopeScaling(kind, **kwargs)


def test_moe_args_refuses():
    with pytest.raises(errors.ConfigError):
        MoEArgs(num_experts=0, top_k=1, hidden_dim=8, layers=())
    with pytest.raises(errors.ConfigError):
        MoEArgs(num_experts=4, top_k=1, hidden_dim=math.nan, layers=())


def test_valid_args_still_accepted():
    assert ModelArgs(**BASE).head_dim == 16
    RopeScaling("llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0)  # Llama 4 Scout: a step
