"""Writing what fine-tuning made: the adapter in PEFT's format, and any loadable model (an adapter merged
in or not) as an HF directory or a GGUF file, each with its lineage record."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from herd.errors import HerdError
from herd.fingerprint import fingerprint
from herd.formats.hf_writer import LINEAGE_FILE, read_lineage
from herd.quant import GGMLTensor
from herd.transforms.lora import lora_state_dict, merge_lora

FORMATS = ("hf", "gguf", "meta")


def canonical_state(model, args, state: dict | None = None) -> dict[str, torch.Tensor]:
    """The model's weights (or `state`, its state dict) under herd's canonical names (a padded-vocab output
    unwrapped; a tied output appears once, as the embedding)."""
    out = {}
    for name, t in (model.state_dict() if state is None else state).items():
        name = name.replace("output.inner.", "output.")
        if name == "output.weight" and args.tie_embeddings:
            continue
        out[name] = t
    return out


def adapter_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    return fingerprint({k: v.float().contiguous() for k, v in tensors.items()})


def write_adapter_dir(out, model, args, rank: int, alpha: float, dropout: float, lineage: dict | None,
                      base_name: str | None = None) -> Path:
    from herd.formats.peft import write_adapter

    out = write_adapter(out, lora_state_dict(model), args, rank, alpha, dropout, base_name)
    if lineage is not None:
        (Path(out) / LINEAGE_FILE).write_text(json.dumps({"format": "herd-lineage", "lineage": lineage}, indent=2))
    return Path(out)


def _rope_divisors(args):
    from dataclasses import replace

    from herd.model.rope import inverse_frequencies

    if args.rope_scaling is None or args.rope_scaling.kind != "llama3":
        return None
    plain = inverse_frequencies(replace(args, rope_scaling=None)).double()
    return (plain / inverse_frequencies(args).double()).float().numpy()


def llama3_rope_from_divisors(args):
    """A GGUF source states llama3 RoPE scaling only as per-frequency divisors (rope_freqs), which HF and
    Meta configs cannot hold: the llama3 parameters that give exactly those divisors (factor = the largest;
    the low/high factors and original context found by trying the values models use), else `args` as they
    are (the writer then says why it cannot)."""
    from dataclasses import replace

    import numpy as np

    from herd.config import RopeScaling

    scaling = args.rope_scaling
    if scaling is None or scaling.kind != "divisors":
        return args
    want = np.asarray(scaling.divisors, dtype=np.float64)
    factor = float(want.max())
    if np.allclose(want, 1.0, rtol=0, atol=1e-6):
        return replace(args, rope_scaling=None)
    for original in (8192, *(2 ** k for k in range(4, 22))):
        for low in (1.0, 2.0):
            for high in (1.0, 2.0, 4.0, 8.0):
                if high < low:
                    continue
                candidate = replace(args, rope_scaling=RopeScaling(
                    "llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                    original_max_position=original))
                if np.allclose(_rope_divisors(candidate), want, rtol=1e-5, atol=0):
                    return candidate
    return args


def gguf_tokenizer_keys(tokenizer, vocab_size: int, eos_token_ids=()) -> dict:
    """A SentencePiece tokenizer.model as sentencepiece_gguf_keys writes it, or an HF tokenizer.json (byte-level BPE: Llama 3, Llama 4, SmolLM ...) as GGUF `tokenizer.ggml.*` keys, laid
    out as llama.cpp's converter does (get_vocab_base): one token per embedding row, added special tokens
    CONTROL, other added tokens USER_DEFINED, ids without a token `[PADn]` UNUSED; the merges as "a b"; the
    pre-tokenizer named by its split regex (herd.tokenizer's table of llama.cpp names)."""
    from herd.errors import FormatError
    from herd.tokenizer.gguf_vocab import PRE_TOKENIZERS

    if tokenizer is not None and tokenizer.kind == "sentencepiece":
        return sentencepiece_gguf_keys(tokenizer, vocab_size, eos_token_ids)
    if tokenizer is None or tokenizer.kind != "hf_json":
        kind = tokenizer.kind if tokenizer is not None else "none"
        raise FormatError(f"GGUF export needs a GGUF tokenizer, an HF tokenizer.json or a SentencePiece "
                          f"tokenizer.model; this model's is {kind}")
    data = json.loads(Path(tokenizer.path).read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise FormatError(f"{tokenizer.path}: a {model.get('type')} tokenizer.json; GGUF export converts byte-level BPE")
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in data.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(3 if added[i].get("special") else 4)  # CONTROL, USER_DEFINED
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(1)  # NORMAL
        else:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    patterns = [n.get("pattern", {}).get("Regex") for n in _walk(data.get("pre_tokenizer"))]
    names = ["llama-bpe", "llama4", *PRE_TOKENIZERS]  # the names llama.cpp's converter writes, first
    pre = next((n for n in names if PRE_TOKENIZERS[n][1] and PRE_TOKENIZERS[n][1] in patterns), "gpt-2")
    config = tokenizer.config or {}

    def token_id(key):
        value = config.get(key)
        text = value.get("content") if isinstance(value, dict) else value
        return model["vocab"].get(text, next((i for i, a in added.items() if a["content"] == text), None))

    keys = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}
    bos, eos = token_id("bos_token"), token_id("eos_token")
    if eos is None and eos_token_ids:
        eos = list(eos_token_ids)[0]
    if bos is not None:
        keys["tokenizer.ggml.bos_token_id"] = bos
        keys["tokenizer.ggml.add_bos_token"] = bool(config.get("add_bos_token", pre in ("llama-bpe", "llama4")))
    if eos is not None:
        keys["tokenizer.ggml.eos_token_id"] = eos
    return keys


# llama.cpp's SentencePieceTokenTypes (= gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def sentencepiece_gguf_keys(tokenizer, vocab_size: int, eos_token_ids=()) -> dict:
    """A SentencePiece tokenizer.model (Llama 1/2) as GGUF keys, laid out as llama.cpp's converter does
    (_set_vocab_sentencepiece / _create_vocab_sentencepiece): model "llama", pre "default"; one token per
    embedding row, each piece with its score and a type from sentencepiece's own predicates (unknown, control,
    unused, byte, else normal: the converter gives user-defined pieces NORMAL too); rows past the model's
    pieces `[PADi]` UNUSED with score -10000; tokenizer_config.json's added_tokens_decoder entries CONTROL
    (special) or USER_DEFINED with score -1000. bos/eos/unk ids are the model's; add_bos_token defaults to
    true as for Llama. The one key the converter leaves to llama.cpp's default, add_space_prefix (true),
    is written only when the model turns its dummy prefix off."""
    import sentencepiece

    from herd.errors import FormatError

    path = Path(tokenizer.path)
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise FormatError(f"{path}: sentencepiece cannot load it ({e})") from None
    n = sp.GetPieceSize()
    if n > vocab_size:
        raise FormatError(f"{path}: {n} pieces, but the model's embedding has only {vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [_UNUSED] * vocab_size
    for i in range(n):
        tokens[i], scores[i] = sp.IdToPiece(i), float(sp.GetScore(i))
        types[i] = (_UNKNOWN if sp.IsUnknown(i) else _CONTROL if sp.IsControl(i) else _UNUSED if sp.IsUnused(i)
                    else _BYTE if sp.IsByte(i) else _NORMAL)
    config = tokenizer.config or {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        if not (str(key).isdigit() and isinstance(entry, dict) and isinstance(entry.get("content"), str)):
            raise FormatError(f"tokenizer_config.json: added_tokens_decoder[{key!r}] is not {{id: {{content}}}}")
        i = int(key)
        if i >= vocab_size:
            raise FormatError(f"tokenizer_config.json: added token id {i} is outside the {vocab_size} embedding rows")
        special = bool(entry.get("special"))
        tokens[i] = entry["content"] if special else entry["content"].replace("\u2581", " ")
        types[i], scores[i] = (_CONTROL if special else _USER_DEFINED), -1000.0
    keys = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types}
    eos = sp.eos_id() if sp.eos_id() >= 0 else next(iter(eos_token_ids), -1)
    for role, value in (("bos", sp.bos_id()), ("eos", eos), ("unknown", sp.unk_id()), ("padding", sp.pad_id())):
        if value >= 0:
            keys[f"tokenizer.ggml.{role}_token_id"] = int(value)
    if sp.bos_id() >= 0:
        keys["tokenizer.ggml.add_bos_token"] = bool(config.get("add_bos_token", True))
    if "add_eos_token" in config:
        keys["tokenizer.ggml.add_eos_token"] = bool(config["add_eos_token"])
    if not _adds_dummy_prefix(path):
        keys["tokenizer.ggml.add_space_prefix"] = False
    return keys


def _adds_dummy_prefix(path: Path) -> bool:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto.normalizer_spec.add_dummy_prefix


def _walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def check_export_target(to: str, out) -> Path:
    """Refuse, before any weights are loaded, an output an export cannot write or would overwrite: HF and Meta
    exports create a new (or empty) directory, a GGUF export a new file in an existing directory."""
    if to not in FORMATS:
        raise HerdError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    out = Path(out)
    if to == "gguf":
        if out.exists() or out.is_symlink():
            raise HerdError(f"{out}: exists; choose a new file name (a GGUF export never overwrites)")
        if not out.parent.is_dir():
            raise HerdError(f"{out}: {out.parent} is not an existing directory to write the GGUF file into")
        return out
    if out.exists() and not out.is_dir():
        raise HerdError(f"{out}: exists and is not a directory (--to {to} writes a directory of files)")
    if out.is_dir() and any(out.iterdir()):
        raise HerdError(f"{out}: exists and is not empty; choose a new directory (an export never overwrites)")
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise HerdError(f"{out}: {above} is a file, so the directory cannot be made")
    return out


def export_model(llm, to: str, out, lineage: dict | None = None, gguf_type: str = "F16",
                 hf_dtype: torch.dtype | None = None, state: dict | None = None) -> tuple[Path, str]:
    """Write `llm`'s model (LoRA merged in first) as `to` ("hf" or "gguf"); returns (path, new fingerprint).
    The fingerprint is of the tensors exactly as written, so `herd info OUT` shows the same value; the
    lineage record, when given, gets it as "fingerprint". `state`: the weights to write instead of the
    model's own (whole tensors gathered from FSDP shards)."""
    check_export_target(to, out)
    ck = llm.checkpoint
    merge_lora(llm.model)
    tensors = canonical_state(llm.model, ck.args, state)
    if to == "meta":
        from herd.formats.meta_writer import write_meta

        stored = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        new_fp = fingerprint(stored)
        if lineage is not None:
            lineage = {**lineage, "fingerprint": new_fp}
        return write_meta(out, llama3_rope_from_divisors(ck.args), stored, ck.tokenizer, lineage), new_fp
    if to == "hf":
        from herd.formats.hf_writer import write_hf

        stored = {k: (v.to(hf_dtype) if hf_dtype else v).detach().cpu().contiguous().clone() for k, v in tensors.items()}
        new_fp = fingerprint(stored)
        if lineage is not None:
            lineage = {**lineage, "fingerprint": new_fp}
        path = write_hf(out, llama3_rope_from_divisors(ck.args), stored, ck.tokenizer, ck.chat_template,
                        ck.eos_token_ids, lineage)
        return path, new_fp
    if ck.args.vision is not None or ck.args.cross_attention_layers:
        from herd.errors import UnsupportedArchitecture

        kind = "Llama 3.2 Vision" if ck.args.cross_attention_layers else "Llama 4 vision"
        raise UnsupportedArchitecture(
            f"{ck.path}: a {kind} model's image weights (encoder, projector"
            f"{', cross-attention layers' if ck.args.cross_attention_layers else ''}) cannot go into a GGUF text "
            "file, and herd writes no mmproj file; `--to hf` or `--to meta` keep them")
    import gguf

    from herd.formats.gguf_writer import gguf_name, stored_type, write_gguf
    from herd.quant.ggml import GGMLType

    # the bytes gguf-py will write, fingerprinted as herd reads them back
    stored = {}
    for k, v in tensors.items():
        arr = v.detach().float().cpu().numpy()
        qtype = stored_type(gguf_name(k, ck.args), arr.ndim, gguf_type)
        try:
            data = gguf.quants.quantize(arr, qtype)
        except gguf.QuantError:
            qtype = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(arr, qtype)
        if GGMLType(int(qtype)) in (GGMLType.F32, GGMLType.F16):  # herd reads float types as torch tensors
            stored[k] = torch.from_numpy(data.copy()).reshape(arr.shape)
        else:
            stored[k] = GGMLTensor(int(qtype), tuple(arr.shape), data.view("uint8").reshape(-1), k)
    new_fp = fingerprint(stored)
    if lineage is not None:
        lineage = {**lineage, "fingerprint": new_fp}
    tokenizer = ck.tokenizer
    if tokenizer is None or tokenizer.kind != "gguf":
        from herd.formats.checkpoint import TokenizerSource

        tokenizer = TokenizerSource("gguf", gguf_metadata=gguf_tokenizer_keys(tokenizer, ck.args.vocab_size,
                                                                              ck.eos_token_ids))
    path = write_gguf(out, ck.args, tensors, tokenizer, name=str(ck.metadata.get("general.name", "herd export")),
                      out_type=gguf_type, chat_template=ck.chat_template, lineage=lineage,
                      rope_divisors=_rope_divisors(ck.args))
    return path, new_fp


def source_lineage(llm, adapter: str | Path | None) -> dict:
    """The lineage of an export: the adapter's own record when it has one (base, data, hyperparameters),
    else a record naming the source (and adapter) it was converted from."""
    from herd.finetune.lineage import make_lineage

    base = {"path": str(llm.checkpoint.path), "format": llm.checkpoint.format, "fingerprint": llm.base_fingerprint}
    if adapter is not None:
        recorded = read_lineage(adapter)
        if recorded is not None:
            return {**recorded, "exported_from": {**base, "adapter": str(adapter)}}
        record = make_lineage(base, "adapter (no lineage record)", {"adapter": str(adapter), **(llm.adapter or {})},
                              None)
        return {**record, "exported_from": {**base, "adapter": str(adapter)}}
    recorded = read_lineage(llm.checkpoint.path) or llm.checkpoint.metadata.get("herd.lineage")
    if recorded:
        return {**recorded, "exported_from": base}
    return {**make_lineage(base, "conversion", {}, None), "exported_from": base}


__all__ = ["export_model", "check_export_target", "write_adapter_dir", "canonical_state", "adapter_fingerprint", "source_lineage", "FORMATS"]
