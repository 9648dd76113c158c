"""Writing what fine-tuning made: the adapter in PEFT's format, and any loadable model (an adapter merged
in or not) as an HF directory or a GGUF file, each with its lineage record."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from herd.errors import HerdError
from herd.fingerprint import fingerprint
from herd.formats.hf_writer import LINEAGE_FILE, read_lineage
from herd.quant import GGMLTensor
from herd.transforms.lora import lora_state_dict, merge_lora

FORMATS = ("hf", "gguf", "meta")
ADAPTER_WEIGHTS = "adapter (A and B, float32)"  # what an adapter's fingerprint is taken over
WEIGHTS_AS_WRITTEN = "the exported weights, as written"


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
                      base_name: str | Path | None = None) -> Path:
    """The adapter in PEFT's format, with its lineage record. `base_name`: the base model's path, written as
    adapter_config.json's base_model_name_or_path in the form transformers resolves (peft_base_name)."""
    from herd.formats.peft import write_adapter

    out = write_adapter(out, lora_state_dict(model), args, rank, alpha, dropout, peft_base_name(base_name))
    if lineage is not None:
        (Path(out) / LINEAGE_FILE).write_text(json.dumps({"format": "herd-lineage", "lineage": lineage}, indent=2))
    return Path(out)


def peft_base_name(base: str | Path | None) -> str | None:
    """base_model_name_or_path for an adapter over `base`: an absolute path, so that it resolves from any
    directory. transformers opens a GGUF file as a directory and the file's name (from_pretrained(dir,
    gguf_file=name)), so a GGUF base is named by its directory: AutoPeftModelForCausalLM.from_pretrained(adapter,
    gguf_file=name) then loads it (the adapter's herd.json keeps the file's full path). A Meta checkpoint
    directory is named as it is, though transformers reads no Meta checkpoints (export it with --to hf)."""
    if base is None:
        return None
    path = Path(base).resolve()
    return str(path.parent if path.is_file() else path)


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
    """A tokenizer as GGUF `tokenizer.ggml.*` keys, laid out as llama.cpp's converter does: a SentencePiece
    tokenizer.model as sentencepiece_gguf_keys writes it; an HF tokenizer.json of byte-level BPE (Llama 3,
    Llama 4, SmolLM ...) as get_vocab_base does: one token per embedding row, added special tokens CONTROL,
    other added tokens USER_DEFINED, ids without a token `[PADn]` UNUSED, the merges as "a b", the
    pre-tokenizer named by its split rule (herd.tokenizer's table of llama.cpp names), add_space_prefix from
    tokenizer_config.json's add_prefix_space (LlamaModel.set_vocab); a tokenizer.json of SentencePiece BPE
    (byte fallback, "▁") by the tokenizer.model beside it, else as spm_json_gguf_keys rebuilds it; a tiktoken
    tokenizer.model through the tokenizer.json herd.tokenizer.hf_files makes of it."""
    from herd.errors import FormatError
    from herd.formats.checkpoint import TokenizerSource
    from herd.tokenizer.gguf_vocab import PRE_TOKENIZERS
    from herd.tokenizer.hf_files import hf_tokenizer_files
    from herd.tokenizer.tiktoken_bpe import is_tiktoken_file

    kind = tokenizer.kind if tokenizer is not None else "none"
    if kind in ("sentencepiece", "tiktoken") and not is_tiktoken_file(Path(tokenizer.path).read_bytes()[:1024]):
        return sentencepiece_gguf_keys(tokenizer, vocab_size, eos_token_ids)
    if kind in ("sentencepiece", "tiktoken"):
        text, config = hf_tokenizer_files(tokenizer)
        data = json.loads(text)
    elif kind == "hf_json":
        data, config = json.loads(Path(tokenizer.path).read_text(encoding="utf-8")), tokenizer.config or {}
    else:
        raise FormatError(f"GGUF export needs a GGUF tokenizer, an HF tokenizer.json or a tokenizer.model "
                          f"(SentencePiece or tiktoken); this model's is {kind}")
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise FormatError(f"{tokenizer.path}: a {model.get('type')} tokenizer.json; GGUF export converts BPE")
    if model.get("byte_fallback"):
        beside = Path(tokenizer.path).with_name("tokenizer.model")
        if beside.is_file() and not is_tiktoken_file(beside.read_bytes()[:1024]):
            return sentencepiece_gguf_keys(TokenizerSource("sentencepiece", beside, config=config), vocab_size,
                                           eos_token_ids)
        return spm_json_gguf_keys(data, config, vocab_size, eos_token_ids)
    tokens, types = _tokens_by_id(data, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    keys = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _pre_name(data.get("pre_tokenizer"), PRE_TOKENIZERS),
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}
    keys.update(_special_keys(data, config, eos_token_ids, keys["tokenizer.ggml.pre"] in ("llama-bpe", "llama4")))
    if isinstance(config.get("add_prefix_space"), bool):
        keys["tokenizer.ggml.add_space_prefix"] = config["add_prefix_space"]
    return keys


def _pre_name(pre_tokenizer, table) -> str:
    """llama.cpp's name for a byte-level split rule: a Split regex of the table (the names llama.cpp's
    converter writes first), each number character alone before GPT-2's rule (SmolLM's Digits), else GPT-2's."""
    nodes = list(_walk(pre_tokenizer))
    patterns = [n.get("pattern", {}).get("Regex") for n in nodes if isinstance(n.get("pattern"), dict)]
    for name in ("llama-bpe", "llama4", *table):
        if table[name][1] and table[name][1] in patterns:
            return name
    digits = any(n.get("type") == "Digits" and n.get("individual_digits") for n in nodes) or r"\p{N}" in patterns
    if digits and any(n.get("type") == "ByteLevel" and n.get("use_regex", True) for n in nodes):
        return "smollm"
    return "gpt-2"


def _tokens_by_id(data: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """One token per embedding row from a tokenizer.json: added special tokens CONTROL, other added tokens
    USER_DEFINED, <0xNN> byte pieces of a byte-fallback vocabulary BYTE, its unk_token UNKNOWN, ids that no
    token has `[PADn]` UNUSED (and so is a token of that name at that id: a padding row written back)."""
    model = data["model"]
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in data.get("added_tokens", [])}
    byte_fallback = bool(model.get("byte_fallback"))
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(_UNKNOWN if added[i]["content"] == model.get("unk_token")
                         else _CONTROL if added[i].get("special") else _USER_DEFINED)
        elif i in by_id:
            token = by_id[i]
            tokens.append(token)
            types.append(_UNKNOWN if token == model.get("unk_token") else
                         _BYTE if byte_fallback and re.fullmatch(r"<0x[0-9A-F]{2}>", token) else
                         _UNUSED if token == f"[PAD{i}]" else _NORMAL)  # the converter's name for a padding row
        else:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
    return tokens, types


_END_ROLES = {"<|eot_id|>": "eot", "<|eot|>": "eot", "<|eom_id|>": "eom", "<|eom|>": "eom"}


def _special_keys(data: dict, config: dict, eos_token_ids, bos_by_default: bool) -> dict:
    """bos/eos/unknown/padding ids named by tokenizer_config.json (the model's unk_token otherwise), eot/eom
    from the reply-ending ids that are Llama 3/4's end-of-turn or end-of-message tokens, and whether BOS/EOS
    are added: tokenizer_config.json's add_bos/eos_token, else the post-processor's template."""
    vocab = data["model"]["vocab"]
    added = {a["content"]: a["id"] for a in data.get("added_tokens", [])}

    def token_id(key):
        value = config.get(key)
        text = value.get("content") if isinstance(value, dict) else value
        return added.get(text, vocab.get(text)) if isinstance(text, str) else None

    ids = {"bos": token_id("bos_token"), "eos": token_id("eos_token"), "unknown": token_id("unk_token"),
           "padding": token_id("pad_token")}
    if ids["eos"] is None and eos_token_ids:
        ids["eos"] = list(eos_token_ids)[0]
    if ids["unknown"] is None and isinstance(data["model"].get("unk_token"), str):
        ids["unknown"] = vocab.get(data["model"]["unk_token"])
    # the other ids that end a reply (config.json's eos_token_id list) by the turn-ending tokens they are
    texts = {i: t for t, i in {**vocab, **added}.items()}
    for i in eos_token_ids:
        role = _END_ROLES.get(texts.get(i))
        if role is not None and i != ids["eos"]:
            ids.setdefault(role, i)
    keys = {f"tokenizer.ggml.{role}_token_id": i for role, i in ids.items() if i is not None}
    processor = next((n for n in _walk(data.get("post_processor")) if n.get("type") == "TemplateProcessing"), {})
    template = [next(iter(step)) for step in processor.get("single") or []]
    if ids["bos"] is not None:
        keys["tokenizer.ggml.add_bos_token"] = bool(config.get("add_bos_token", template[:1] == ["SpecialToken"]
                                                               if template else bos_by_default))
    if ids["eos"] is not None and ("add_eos_token" in config or template[-1:] == ["SpecialToken"]):
        keys["tokenizer.ggml.add_eos_token"] = bool(config.get("add_eos_token", True))
    return keys


def spm_json_gguf_keys(data: dict, config: dict, vocab_size: int, eos_token_ids=()) -> dict:
    """A SentencePiece-style BPE tokenizer.json (byte fallback, "▁" for space) with no tokenizer.model as GGUF
    "llama" keys. A tokenizer.json has no scores; llama.cpp joins the adjacent pair whose joined piece scores
    highest, so each piece scores minus the rank of the first merge that makes it (pieces no merge makes
    score below all of those): the same order the merges give (gguf-py's LlamaHfVocab scores every piece
    -1000, which loses it). The dummy prefix is on unless the pipeline has neither a Prepend normalizer nor a
    prepending Metaspace (or tokenizer_config.json's add_prefix_space says otherwise)."""
    tokens, types = _tokens_by_id(data, vocab_size)
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in data["model"].get("merges", [])]
    first_merge: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        first_merge.setdefault(left + right, rank)
    unmerged = -float(len(merges) + 1)
    scores = [-float(first_merge[t] + 1) if k == _NORMAL and t in first_merge else unmerged if k == _NORMAL else 0.0
              for t, k in zip(tokens, types)]
    keys = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types}
    keys.update(_special_keys(data, config, eos_token_ids, True))
    nodes = list(_walk(data.get("normalizer"))) + list(_walk(data.get("pre_tokenizer")))
    prefix = any(n.get("type") == "Prepend" or (n.get("type") == "Metaspace" and n.get("prepend_scheme", "always")
                                                != "never") for n in nodes)
    if not config.get("add_prefix_space", prefix):
        keys["tokenizer.ggml.add_space_prefix"] = False
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
    """Write `llm`'s model (LoRA merged in first) as `to` ("hf", "gguf" or "meta"); returns (path, new
    fingerprint). The fingerprint is of the tensors exactly as written, so `herd info OUT` shows the same value;
    the lineage record, when given, gets it as "fingerprint". `state`: the weights to write instead of the
    model's own (whole tensors gathered from FSDP shards). An HF or Meta directory gets the tokenizer as
    files (herd.tokenizer.hf_files: a tokenizer.json with the source's token ids) and its chat template."""
    check_export_target(to, out)
    ck = llm.checkpoint
    tokenizer_json = None
    # converted before the weights are touched (a tokenizer it cannot write stops the export here); a Meta
    # directory keeps a tokenizer.model as it is
    if to == "hf" or (to == "meta" and ck.tokenizer is not None and ck.tokenizer.kind == "gguf"):
        from herd.tokenizer.hf_files import hf_tokenizer_files

        tokenizer_json = hf_tokenizer_files(ck.tokenizer)
    merge_lora(llm.model)
    tensors = canonical_state(llm.model, ck.args, state)
    if to == "meta":
        from herd.formats.meta_writer import write_meta

        stored = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        new_fp = fingerprint(stored)
        return write_meta(out, llama3_rope_from_divisors(ck.args), stored, ck.tokenizer,
                          _with_fingerprint(lineage, new_fp), ck.chat_template, tokenizer_json), new_fp
    if to == "hf":
        from herd.formats.hf_writer import write_hf

        stored = {k: (v.to(hf_dtype) if hf_dtype else v).detach().cpu().contiguous().clone() for k, v in tensors.items()}
        new_fp = fingerprint(stored)
        path = write_hf(out, llama3_rope_from_divisors(ck.args), stored, ck.tokenizer, ck.chat_template,
                        ck.eos_token_ids, _with_fingerprint(lineage, new_fp), tokenizer_json=tokenizer_json)
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

    tokenizer = ck.tokenizer
    if tokenizer is None or tokenizer.kind != "gguf":
        from herd.formats.checkpoint import TokenizerSource

        tokenizer = TokenizerSource("gguf", gguf_metadata=gguf_tokenizer_keys(tokenizer, ck.args.vocab_size,
                                                                              ck.eos_token_ids))
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
    path = write_gguf(out, ck.args, tensors, tokenizer, name=str(ck.metadata.get("general.name", "herd export")),
                      out_type=gguf_type, chat_template=ck.chat_template, lineage=_with_fingerprint(lineage, new_fp),
                      rope_divisors=_rope_divisors(ck.args))
    return path, new_fp


def _gguf_lineage(metadata: dict) -> dict | None:
    from herd.formats.gguf_writer import LINEAGE_KEY

    try:
        record = json.loads(metadata.get(LINEAGE_KEY) or "null")
    except (TypeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _with_fingerprint(lineage: dict | None, new_fp: str) -> dict | None:
    """The export's lineage with "fingerprint" the written weights' own (a record carried over from the source
    named the source's weights, or the adapter's)."""
    if lineage is None:
        return None
    return {**lineage, "fingerprint": new_fp, "fingerprint_of": WEIGHTS_AS_WRITTEN}


def source_lineage(llm, adapter: str | Path | None) -> dict:
    """The lineage of an export, before its own fingerprint is known: the source's record when it has one
    (an adapter's: base, data, hyperparameters; a fine-tuned export's), else a record naming the source it
    was converted from. With an adapter, "base" is the model it was trained over, "adapter" the adapter's path
    and its fingerprint (computed from the weights merged, under the adapter's name), and "exported_from" the
    base the export merged it into."""
    from herd.finetune.lineage import make_lineage

    base = {"path": str(llm.checkpoint.path), "format": llm.checkpoint.format, "fingerprint": llm.base_fingerprint}
    if adapter is not None:
        adapter_record = {"path": str(Path(adapter).resolve()), "fingerprint_of": ADAPTER_WEIGHTS,
                          "fingerprint": adapter_fingerprint(lora_state_dict(llm.model))}
        recorded = read_lineage(adapter)
        if recorded is None:
            record = make_lineage(base, "adapter (no lineage record)", dict(llm.adapter or {}), None,
                                  parent=adapter_record)
        else:
            if recorded.get("fingerprint") not in (None, adapter_record["fingerprint"]):
                adapter_record["recorded_fingerprint"] = recorded["fingerprint"]  # the adapter changed after training
            record = {k: v for k, v in recorded.items() if k not in ("fingerprint", "fingerprint_of")}
            record["adapter"] = adapter_record
        return {**record, "exported_from": {**base, "adapter": str(adapter)}}
    recorded = read_lineage(llm.checkpoint.path) or _gguf_lineage(llm.checkpoint.metadata)
    if recorded:
        return {**recorded, "exported_from": base}
    return {**make_lineage(base, "conversion", {}, None), "exported_from": base}


__all__ = ["export_model", "check_export_target", "write_adapter_dir", "canonical_state", "adapter_fingerprint",
           "source_lineage", "peft_base_name", "gguf_tokenizer_keys", "FORMATS"]
