"""GGUF (llama.cpp) reader: header, metadata, tensor table -> Checkpoint over one memory map.

Layout (docs §7.1): magic "GGUF", u32 version (2 or 3), u64 tensor count, u64 KV count, the KVs,
the tensor infos, padding to `general.alignment`, then the tensor data. Every length and offset
is checked against the file before it is used; tensors must tile the data section exactly as
llama.cpp's gguf.c requires, which is how a wrong type or shape in a tensor info is caught.
GGUF already stores q/k in Meta's interleaved RoPE order, so tensors are only renamed.
"""

from __future__ import annotations

import math
import re
import struct
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from herd.config import ModelArgs, MoEArgs, RopeScaling
from herd.errors import (
    BadMagic,
    ConfigError,
    FormatError,
    ShapeMismatch,
    TruncatedFile,
    UnexpectedTensor,
    UnsupportedArchitecture,
)
from herd.formats.checkpoint import Checkpoint, TokenizerSource
from herd.formats.fields import check_layer_count, naming
from herd.quant import GGMLTensor
from herd.quant.ggml import GGMLType, ggml_type, tensor_nbytes

# Sanity caps: a count or length above these is corruption, not a big model.
_MAX_COUNT = 1 << 24  # tensors, KV pairs
_MAX_ARRAY = 1 << 32
_MAX_STRING = 1 << 30
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 8  # arrays of arrays

# GGUF value type -> format code, valid for both struct and numpy
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY, _BOOL = 8, 9, 7
_FLOAT_NP = {GGMLType.F32: np.float32, GGMLType.F16: np.float16, GGMLType.BF16: np.int16}  # BF16: no numpy dtype

# llama_ftype (general.file_type) -> name, for the quantization summary
_FILE_TYPES = dict(enumerate(
    "F32 F16 Q4_0 Q4_1 Q4_1_SOME_F16 Q4_2 Q4_3 Q8_0 Q5_0 Q5_1 Q2_K Q3_K_S Q3_K_M Q3_K_L Q4_K_S Q4_K_M Q5_K_S "
    "Q5_K_M Q6_K IQ2_XXS IQ2_XS Q2_K_S IQ3_XS IQ3_XXS IQ1_S IQ4_NL IQ3_S IQ3_M IQ2_S IQ2_M IQ4_XS IQ1_M BF16 "
    "Q4_0_4_4 Q4_0_4_8 Q4_0_8_8 TQ1_0 TQ2_0 MXFP4_MOE NVFP4 Q1_0".split()))


class _Reader:
    """Little-endian cursor over the mapped file; every read is bounds-checked."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def need(self, n: int, what: str) -> int:
        start = self.pos
        if start + n > self.size:
            raise TruncatedFile(
                f"{self.path}: {what} needs {n} bytes at offset {start}, but the file is {self.size} bytes "
                f"({start + n - self.size} missing)"
            )
        self.pos += n
        return start

    def scalar(self, vtype: int, what: str):
        fmt = _SCALAR[vtype]
        (value,) = struct.unpack_from(fmt, self.buf, self.need(struct.calcsize(fmt), what))
        if vtype == 6:  # shortest decimal that is the same float32: norm_eps reads 1e-05, not 9.99999974e-06
            return float(str(np.float32(value)))
        return bool(value) if vtype == _BOOL else value

    def count(self, what: str, cap: int) -> int:
        n = self.scalar(10, what)
        if n > cap:
            raise FormatError(f"{self.path}: {what} is {n}, which cannot be right (limit {cap}); the file is corrupt")
        return n

    def string(self, what: str) -> str:
        n = self.count(f"length of {what}", _MAX_STRING)
        start = self.need(n, what)
        try:
            return str(self.buf[start : start + n], "utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{self.path}: {what} at offset {start} is not valid UTF-8 ({e.reason})") from None

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALAR:
            return self.scalar(vtype, what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise FormatError(f"{self.path}: {what} has unknown value type {vtype}")
        etype = self.scalar(4, f"element type of {what}")
        n = self.count(f"length of {what}", _MAX_ARRAY)
        if etype in _SCALAR:  # numeric arrays in one go: vocabularies have 10^5 entries
            dtype = np.dtype(_SCALAR[etype])
            start = self.need(n * dtype.itemsize, what)
            values = np.frombuffer(self.buf, dtype, n, start).tolist()
            return [bool(v) for v in values] if etype == _BOOL else values
        if etype == _STRING:
            return self.strings(n, what)
        if depth >= _MAX_NESTING:  # arrays of arrays: no Llama key needs more than one level
            raise FormatError(f"{self.path}: {what} nests arrays more than {_MAX_NESTING} deep")
        return [self.value(etype, f"{what}[{i}]", depth + 1) for i in range(n)]

    def strings(self, n: int, what: str) -> list[str]:
        """n strings in a row (vocabularies and merges: 10^5 of them) in one tight loop; any problem is
        reported by re-reading the failing one with the checked path."""
        buf, size, pos, out = self.buf, self.size, self.pos, []
        length_at = struct.Struct("<Q").unpack_from
        try:
            for _ in range(n):
                (length,) = length_at(buf, pos)
                end = pos + 8 + length
                if end > size:
                    raise ValueError
                out.append(str(buf[pos + 8 : end], "utf-8"))
                pos = end
        except (ValueError, struct.error):
            self.pos = pos
            self.string(f"{what}[{len(out)}]")  # raises the specific error (truncation, length, UTF-8)
            raise
        self.pos = pos
        return out


def _header(r: _Reader) -> tuple[int, dict[str, Any], list[tuple[str, tuple[int, ...], int, int]]]:
    magic = bytes(r.buf[:4])
    if magic != b"GGUF"[: len(magic)]:
        raise BadMagic(f"{r.path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    r.need(4, "GGUF magic")
    version = r.scalar(4, "GGUF version")
    if version not in (2, 3):
        if int.from_bytes(version.to_bytes(4, "little"), "big") in (1, 2, 3):
            raise FormatError(f"{r.path}: big-endian GGUF files are not supported")
        raise FormatError(f"{r.path}: GGUF version {version} is not supported (herd reads versions 2 and 3)")
    n_tensors = r.count("tensor count", _MAX_COUNT)
    n_kv = r.count("metadata count", _MAX_COUNT)
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = r.string(f"metadata key #{i}")
        if key in metadata:
            raise FormatError(f"{r.path}: metadata key {key!r} appears twice")
        metadata[key] = r.value(r.scalar(4, f"value type of {key!r}"), f"metadata {key!r}")
    infos = []
    for i in range(n_tensors):
        name = r.string(f"name of tensor #{i}")
        n_dims = r.scalar(4, f"dimension count of {name}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise FormatError(f"{r.path}: tensor {name} has {n_dims} dimensions (GGUF allows 1..{_MAX_DIMS})")
        ne = [r.scalar(10, f"dimensions of {name}") for _ in range(n_dims)]
        if math.prod(ne) >= 1 << 62:  # gguf.c's overflow guard
            raise FormatError(f"{r.path}: tensor {name} has an impossible dimension in {ne}")
        type_ = r.scalar(4, f"type of {name}")
        offset = r.scalar(10, f"data offset of {name}")
        infos.append((name, tuple(reversed(ne)), type_, offset))  # ne[0] is fastest: PyTorch order is reversed
    return version, metadata, infos


def _tensors(r: _Reader, mm: np.ndarray, infos, alignment: int) -> tuple[dict[str, Any], Counter]:
    """Views over the data section; tensors must follow one another exactly as gguf.c lays them out."""
    data_start = -(-r.pos // alignment) * alignment
    tensors, types, expected, before = {}, Counter(), 0, "the data section starts"
    for name, shape, type_, offset in infos:
        if name in tensors:
            raise FormatError(f"{r.path}: tensor {name} appears twice")
        t = ggml_type(type_, f"{r.path}: tensor {name}")
        nbytes = tensor_nbytes(t, shape, f"{r.path}: tensor {name}")
        if offset != expected:  # the previous tensor's declared type/shape does not fit the bytes it was given
            raise FormatError(
                f"{r.path}: tensor {name} starts at data offset {offset}, but {before} at {expected}; "
                "a tensor's declared type or shape disagrees with its stored bytes"
            )
        start, end = data_start + offset, data_start + offset + nbytes
        if end > r.size:
            raise TruncatedFile(
                f"{r.path}: tensor {name} ({t.name} {list(shape)}) needs {nbytes} bytes at file offset {start}, "
                f"but the file is {r.size} bytes ({end - r.size} missing)"
            )
        expected += -(-nbytes // alignment) * alignment
        before = f"{name} ({t.name} {list(shape)}, {nbytes} bytes) ends"
        raw = mm[start:end]
        types[t.name] += 1
        if t in _FLOAT_NP:
            tensors[name] = _float_view(raw, t, shape)
        else:
            tensors[name] = GGMLTensor(int(t), shape, raw, name)
    return tensors, types


def _float_view(raw: np.ndarray, t: GGMLType, shape: tuple[int, ...]) -> torch.Tensor:
    """Zero-copy torch tensor over the map (copy-on-write pages: writes never reach the file)."""
    with warnings.catch_warnings():  # torch warns about non-writable arrays; the map is copy-on-write
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(np.asarray(raw).view(_FLOAT_NP[t]).reshape(shape))
    return tensor.view(torch.bfloat16) if t == GGMLType.BF16 else tensor


# ---- names --------------------------------------------------------------------------------------

_GLOBAL = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_LAYER = {
    "attn_norm.weight": "attention_norm.weight",
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
}
_LAYER_MOE = {  # Llama 4 only; stacked experts carry no `.weight` suffix in herd's vocabulary
    "ffn_gate_inp.weight": "feed_forward.router.weight",
    "ffn_gate_exps.weight": "feed_forward.experts.w1",
    "ffn_up_exps.weight": "feed_forward.experts.w3",
    "ffn_down_exps.weight": "feed_forward.experts.w2",
    "ffn_gate_shexp.weight": "feed_forward.shared_expert.w1.weight",
    "ffn_down_shexp.weight": "feed_forward.shared_expert.w2.weight",
    "ffn_up_shexp.weight": "feed_forward.shared_expert.w3.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def _canonical(name: str, arch: str, n_layers: int, path: Path) -> str:
    layer_table = {**_LAYER, **_LAYER_MOE} if arch == "llama4" else _LAYER
    stem = name.removesuffix(".bias") + ".weight"
    if name.endswith(".bias") and (stem in _GLOBAL or (m := _BLOCK.fullmatch(stem)) and m[2] in layer_table):
        raise UnsupportedArchitecture(f"{path}: bias tensor {name}: herd's Llama layers have no biases")
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _BLOCK.fullmatch(name)
    if m and m[2] in layer_table and int(m[1]) < n_layers:
        return f"layers.{int(m[1])}.{layer_table[m[2]]}"
    raise UnexpectedTensor(f"{path}: tensor {name} has no place in a {arch} model with {n_layers} layers")


# ---- config -------------------------------------------------------------------------------------

# ModelArgs field -> the GGUF key (after "{arch}.") it comes from, for messages about impossible values
_ARG_KEYS = {
    "dim": "embedding_length", "n_layers": "block_count", "n_heads": "attention.head_count",
    "n_kv_heads": "attention.head_count_kv", "vocab_size": "vocab_size", "hidden_dim": "feed_forward_length",
    "norm_eps": "attention.layer_norm_rms_epsilon", "rope_theta": "rope.freq_base", "max_seq_len": "context_length",
    "head_dim": "rope.dimension_count", "rope_scaling": "rope.scaling.factor", "moe": "expert_count",
    "attention_chunk_size": "attention.sliding_window", "floor_scale": "attention.temperature_length",
    "attn_scale": "attention.temperature_scale",
}

# Keys that change the maths unless they hold one of the neutral values listed (empty: any value refused).
_MATH_KEYS: dict[str, tuple] = {
    "logit_scale": (1.0,), "embedding_scale": (1.0,), "residual_scale": (1.0,),
    "attention.scale": (0.0,), "attention.output_scale": (1.0,), "attention.clamp_kqv": (0.0,),
    "attention.max_alibi_bias": (0.0,), "attn_logit_softcapping": (0.0,), "final_logit_softcapping": (0.0,),
    "router_logit_softcapping": (0.0,), "attention.layer_norm_epsilon": (), "use_parallel_residual": (False,),
    "rope.dimension_sections": (),
    "rope.scaling.attn_factor": (1.0,), "swiglu_clamp_exp": (), "swiglu_clamp_shexp": (),
    "expert_weights_norm": (False,), "expert_weights_scale": (0.0, 1.0), "leading_dense_block_count": (0,),
    "moe_every_n_layers": (), "full_attention_interval": (), "expert_group_count": (0, 1),
}
_MATH_KEYS_LLAMA = {  # Llama 1-3: a MoE (Mixtral-style softmax routing) or sliding window is another model
    "expert_count": (0,), "expert_used_count": (0,), "attention.sliding_window": (0,),
    "attention.sliding_window_pattern": (), "interleave_moe_layer_step": (), "rope.freq_base_swa": (),
}
_MATH_KEYS_LLAMA4 = {  # llama.cpp's llama4 graph: sigmoid gate, one shared expert, 3 chunked : 1 global
    "expert_gating_func": (2,), "expert_shared_count": (1,), "attention.sliding_window_pattern": (4,),
}


def _args(md: dict[str, Any], arch: str, tensors: dict[str, Any], path: Path) -> ModelArgs:
    def get(key: str, default: Any = ConfigError, kind: type = int):
        value = md.get(f"{arch}.{key}", default)
        if value is ConfigError:
            raise ConfigError(f"{path}: GGUF metadata lacks {arch}.{key}")
        if isinstance(value, list):
            raise UnsupportedArchitecture(f"{path}: {arch}.{key} varies per layer; herd needs one value")
        types = (int, float) if kind is float else kind
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            raise FormatError(f"{path}: {arch}.{key} should be a {kind.__name__}, got {value!r}")
        return value

    math_keys = {**_MATH_KEYS, **(_MATH_KEYS_LLAMA4 if arch == "llama4" else _MATH_KEYS_LLAMA)}
    for key, neutral in math_keys.items():
        if f"{arch}.{key}" in md and (value := md[f"{arch}.{key}"]) not in neutral:
            raise UnsupportedArchitecture(f"{path}: {arch}.{key} = {value!r} changes the maths and herd lacks it")
    theta = float(get("rope.freq_base", 10000.0, float))
    if arch == "llama4" and get("rope.freq_base_swa", theta, float) != theta:
        raise UnsupportedArchitecture(f"{path}: {arch}.rope.freq_base_swa differs from rope.freq_base")

    n_layers = get("block_count")
    # before anything is sized by it: a header may claim 2^31 layers over a file that holds 30
    check_layer_count(n_layers, tensors, r"blk\.(\d+)\.", path, f"{arch}.block_count", metadata_only=True)
    n_heads = get("attention.head_count")
    if n_heads <= 0:
        raise ConfigError(f"{path}: {arch}.attention.head_count must be positive, got {n_heads}")
    head_keys = ("rope.dimension_count", "attention.key_length", "attention.value_length")
    head_dims = {get(k, None) for k in head_keys} - {None}
    if len(head_dims) > 1:  # partial rotary or unequal k/v heads
        raise UnsupportedArchitecture(f"{path}: {', '.join(head_keys)} disagree: {sorted(head_dims)}")
    head_dim = head_dims.pop() if head_dims else None

    rope_scaling = None
    if "rope_freqs.weight" in tensors:  # llama3-style scaling, stored as per-frequency divisors
        freqs = tensors["rope_freqs.weight"]
        freqs = freqs.dequantize() if isinstance(freqs, GGMLTensor) else freqs.float()
        half = (head_dim or get("embedding_length") // n_heads) // 2
        if freqs.numel() != half:
            raise ShapeMismatch(f"{path}: rope_freqs.weight has {freqs.numel()} values, expected head_dim/2 = {half}")
        with naming(path, {"rope_scaling": "rope_freqs.weight"}):
            rope_scaling = RopeScaling("divisors", divisors=tuple(freqs.reshape(-1).tolist()))
    kind = get("rope.scaling.type", None, str)
    factor = get("rope.scaling.factor", None, float) or get("rope.scale_linear", None, float)  # scale_linear: old files
    if kind not in (None, "none", "linear"):
        raise UnsupportedArchitecture(f"{path}: {arch}.rope.scaling.type {kind!r} (herd knows linear and llama3)")
    if kind != "none" and factor not in (None, 0.0, 1.0):  # llama.cpp reads a bare factor as linear
        if rope_scaling is not None:
            raise UnsupportedArchitecture(f"{path}: both rope_freqs and linear RoPE scaling; herd applies one")
        with naming(path, {"rope_scaling": f"{arch}.rope.scaling.factor"}):
            rope_scaling = RopeScaling("linear", factor=float(factor))

    if "token_embd.weight" in tensors:
        embd_rows = tensors["token_embd.weight"].shape[0]
    else:  # the loader reports the missing tensor; the vocabulary size is only needed to get there
        tokens = md.get("tokenizer.ggml.tokens")
        embd_rows = len(tokens) if isinstance(tokens, list) and tokens else ConfigError  # ConfigError: required
    vocab_size = get("vocab_size", embd_rows)
    if "token_embd.weight" in tensors and vocab_size != embd_rows:
        raise ShapeMismatch(f"{path}: {arch}.vocab_size is {vocab_size}, but token_embd.weight has {embd_rows} rows")
    common = dict(
        dim=get("embedding_length"),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=get("attention.head_count_kv", n_heads),
        vocab_size=vocab_size,
        hidden_dim=get("feed_forward_length"),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", kind=float)),
        rope_theta=theta,
        max_seq_len=get("context_length"),
        head_dim=head_dim,
        rope_scaling=rope_scaling,
        tie_embeddings="output.weight" not in tensors,
    )
    names = {field: f"{arch}.{key}" for field, key in _ARG_KEYS.items()}
    if arch == "llama":
        with naming(path, names):
            return ModelArgs(**common)

    n_experts = get("expert_count", 0)
    moe = None
    if n_experts:
        step = get("interleave_moe_layer_step", 1)  # llama.cpp: layer i is MoE iff (i+1) % step == 0
        if step < 0:
            raise ConfigError(f"{path}: {arch}.interleave_moe_layer_step must not be negative, got {step}")
        with naming(path, names):
            moe = MoEArgs(n_experts, get("expert_used_count"), get("expert_feed_forward_length"),
                          tuple(range(step - 1, n_layers, step)) if step else ())
    # llama.cpp has no key for the NoPE interval: it is hard-coded to 4 (hparams n_no_rope_layer_step),
    # and only `attention.sliding_window == 0` (MobileLLM) turns both NoPE and chunking off.
    window = get("attention.sliding_window", 8192)
    nope = tuple(range(3, n_layers, 4)) if window else ()
    with naming(path, names):
        return ModelArgs(
            **common,
            moe=moe,
            nope_layers=nope,
            attention_chunk_size=window or None,  # llama.cpp ignores a non-zero value and uses 8192
            # No GGUF key says whether q/k are normed: llama.cpp decides by model type, off only for
            # the 128-expert Maverick (matching HF's use_qk_norm: Scout true, Maverick false).
            use_qk_norm=n_experts != 128,
            attn_temperature_tuning=bool(nope),  # NoPE layers only
            # gguf-py's attention.temperature_length/_scale keys; llama.cpp's defaults are 8192 and 0.1.
            floor_scale=float(get("attention.temperature_length", 8192, kind=float)),
            attn_scale=float(get("attention.temperature_scale", 0.1, kind=float)),
        )


def _generation(md: dict[str, Any], arch: str, args: ModelArgs, tensors: dict[str, Any]) -> str:
    vocab, tok_model = args.vocab_size, md.get("tokenizer.ggml.model")
    if arch == "llama4":
        return "4"
    if tok_model == "gpt2" and vocab == 128256:
        if "rope_freqs.weight" not in tensors:
            return "3"
        return "3.2" if args.tie_embeddings else "3.1"
    if tok_model == "llama" and vocab == 32000:
        return "1" if args.norm_eps <= 1e-6 and args.max_seq_len <= 2048 else "2"
    return "unknown"


def read_gguf_parts(path: Path) -> tuple[int, dict[str, Any], dict[str, Any], Counter]:
    """(version, metadata, tensors under their GGUF names, count of tensors per type) of any GGUF file, its
    tensor data memory-mapped, every length and offset checked."""
    size = path.stat().st_size
    if size == 0:
        raise TruncatedFile(f"{path}: the file is empty (a GGUF header needs at least 24 bytes)")
    mm = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: torch may hold writable views safely
    r = _Reader(memoryview(mm), path)
    version, md, infos = _header(r)
    alignment = md.get("general.alignment", 32)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise FormatError(f"{path}: general.alignment {alignment!r} is not a power of two")
    raw, types = _tensors(r, mm, infos, alignment)
    return version, md, raw, types


def read_gguf(path: str | Path) -> Checkpoint:
    """Read a GGUF file into a Checkpoint with canonical tensor names; tensor data stays memory-mapped."""
    path = Path(path)
    version, md, raw, types = read_gguf_parts(path)
    arch = md.get("general.architecture")
    if arch == "clip":
        raise UnsupportedArchitecture(f"{path}: an image projector file (mmproj, architecture 'clip'), not a model: "
                                      "load the text model's GGUF with this file as its mmproj")
    if arch not in ("llama", "llama4"):
        raise UnsupportedArchitecture(f"{path}: GGUF architecture {arch!r} is not supported (herd reads llama, llama4)")
    args = _args(md, arch, raw, path)
    tensors = {}
    for name, t in raw.items():
        if name != "rope_freqs.weight":
            canonical = _canonical(name, arch, args.n_layers, path)
            if canonical in tensors:  # blk.7 and blk.07
                raise FormatError(f"{path}: tensor {name} is a second {canonical}")
            tensors[canonical] = t

    tokens = md.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and "token_embd.weight" in raw and len(tokens) != args.vocab_size:
        # llama.cpp sizes token_embd as [n_embd, number of tokens] and refuses any other shape: a vocabulary
        # shorter than the embedding would let the model emit ids no token stands for.
        raise ShapeMismatch(
            f"{path}: tokenizer.ggml.tokens holds {len(tokens)} tokens, but token_embd.weight has "
            f"{args.vocab_size} rows; a GGUF file needs one token per embedding row"
        )
    tok_md = {k: v for k, v in md.items() if k.startswith("tokenizer.")}
    eos = [md.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    file_type = md.get("general.file_type")
    summary = ", ".join(f"{name} ×{n}" for name, n in types.most_common())
    if isinstance(file_type, int):
        summary += f" (file type {_FILE_TYPES.get(file_type, file_type)})"
    metadata = {k: v for k, v in md.items() if k.startswith("general.")}
    metadata["gguf.version"] = version
    template = md.get("tokenizer.chat_template")
    return Checkpoint(
        args=args,
        tensors=tensors,
        format="gguf",
        path=path,
        tokenizer=TokenizerSource(kind="gguf", path=path, gguf_metadata=tok_md),
        chat_template=template if isinstance(template, str) else None,
        generation=_generation(md, arch, args, raw),
        quantization=summary or "none",
        eos_token_ids=tuple(dict.fromkeys(i for i in eos if isinstance(i, int) and not isinstance(i, bool))),
        metadata=metadata,
    )


__all__ = ["read_gguf", "read_gguf_parts"]
