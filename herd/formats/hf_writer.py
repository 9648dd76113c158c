"""Writing an HF directory (config.json + model.safetensors + tokenizer files) that transformers loads:
herd's canonical tensors renamed back to HF's (herd.formats.hf.LAYER_MAP inverted).

Llama 1-3 become a LlamaForCausalLM with q/k rows permuted back to rotate_half order. Llama 4 becomes a
Llama4ForCausalLM (model_type llama4_text, the text model only): q/k stay as they are (HF Llama 4 is
interleaved), the dense FFN and the router / shared expert live under `feed_forward.`, and each MoE layer's
routed experts are fused as transformers stores them, gate_up_proj [E, D, 2F] (x @ W, gate first) and
down_proj [E, F, D].

Image models become what herd's reader (herd.formats.hf) reads, run backwards: Llama 3.2 Vision an
MllamaForConditionalGeneration (the cross-attention layers put back into the text layer list, the encoder's
unfolded patch linear as a convolution) and Llama 4 with its vision tower a Llama4ForConditionalGeneration;
tensors under the hub files' names (language_model.model.*, language_model.lm_head, vision_model.*,
multi_modal_projector.*)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from herd.config import ModelArgs
from herd.errors import FormatError, UnsupportedArchitecture
from herd.formats.checkpoint import TokenizerSource
from herd.formats.fields import read_json
from herd.formats.herdq import is_json
from herd.formats.hf import (
    LAYER_MAP,
    MLLAMA_CROSS_MAP,
    MLLAMA_VISION_LAYER_MAP,
    MLLAMA_VISION_MAP,
    VISION_LAYER_MAP,
    VISION_MAP,
    permute_for_rotate_half,
)

LINEAGE_FILE = "herd.json"
_HERD_TO_HF = {v: k for k, v in LAYER_MAP.items() if k.startswith(("self_attn.", "mlp.", "input_", "post_"))}
_HERD_TO_HF4 = {v: k for k, v in LAYER_MAP.items() if not k.startswith("mlp.")}
_EXPERTS = ("feed_forward.experts.w1", "feed_forward.experts.w2", "feed_forward.experts.w3")


def _rope_config(args: ModelArgs) -> dict | None:
    scaling = args.rope_scaling
    if scaling is None:
        return None
    if scaling.kind == "llama3":
        return {"rope_type": "llama3", "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
                "high_freq_factor": scaling.high_freq_factor,
                "original_max_position_embeddings": scaling.original_max_position}
    if scaling.kind == "linear":
        return {"rope_type": "linear", "factor": scaling.factor}
    if any(abs(d - 1.0) > 0 for d in scaling.divisors):
        raise UnsupportedArchitecture("this model's RoPE frequencies come as per-frequency divisors (GGUF "
                                      "rope_freqs), which an HF config cannot state")
    return None


def _llama4_config(args: ModelArgs, common: dict) -> dict:
    moe = args.moe
    if moe is None:
        raise UnsupportedArchitecture("a Llama 4 model without experts has no Llama4ForCausalLM layout")
    if args.floor_scale != int(args.floor_scale):
        raise UnsupportedArchitecture(f"temperature floor_scale {args.floor_scale} is not a whole number, which "
                                      "Llama4TextConfig requires")
    return {
        **common, "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text",
        "intermediate_size": moe.hidden_dim, "intermediate_size_mlp": args.hidden_dim,
        "num_local_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
        "moe_layers": list(moe.layers), "interleave_moe_layer_step": _step(moe.layers, args.n_layers),
        # 1 = this layer uses RoPE (transformers' convention)
        "no_rope_layers": [int(i not in args.nope_layers) for i in range(args.n_layers)],
        "attention_chunk_size": args.attention_chunk_size, "use_qk_norm": args.use_qk_norm,
        "attn_temperature_tuning": args.attn_temperature_tuning, "floor_scale": int(args.floor_scale),
        "attn_scale": args.attn_scale, "router_jitter_noise": 0.0, "router_aux_loss_coef": 0.001,
    }


def _step(layers: tuple[int, ...], n_layers: int) -> int:
    """interleave_moe_layer_step for informational readers; moe_layers (always written) is what counts."""
    for step in range(1, n_layers + 1):
        if tuple(range(step - 1, n_layers, step)) == tuple(layers):
            return step
    return 1


def mllama_hf_layers(args: ModelArgs) -> tuple[list[int], list[int]]:
    """(HF index of each self-attention layer, HF index of each cross-attention layer): MllamaTextConfig
    counts both in one list, cross-attention layer k standing just before self-attention layer
    args.cross_attention_layers[k] (the inverse of herd.formats.hf._mllama_args)."""
    fusion = sorted(args.cross_attention_layers)
    cross = [f + k for k, f in enumerate(fusion)]
    self_layers = [i + sum(f <= i for f in fusion) for i in range(args.n_layers)]
    return self_layers, cross


def _rope_parameters(args: ModelArgs) -> dict:
    return {"rope_theta": args.rope_theta, **(_rope_config(args) or {"rope_type": "default"})}


def _mllama_config(args: ModelArgs, common: dict, pad_token_id: int | None) -> dict:
    v = args.vision
    if v is None:
        raise UnsupportedArchitecture("this Llama 3.2 Vision model was loaded without its image encoder; an "
                                      "MllamaForConditionalGeneration needs it (load the checkpoint with its "
                                      "vision weights)")
    if args.extra_embeddings != 8:
        raise UnsupportedArchitecture(f"{args.extra_embeddings} embedding rows past the vocabulary; "
                                      "MllamaTextModel has 8")
    _, cross = mllama_hf_layers(args)
    text = {**common, "model_type": "mllama_text_model", "num_hidden_layers": args.n_layers + len(cross),
            "cross_attention_layers": cross, "intermediate_size": args.hidden_dim,
            "rope_parameters": _rope_parameters(args),
            # MllamaTextConfig's default is Llama 3's 128004 (<|finetune_right_pad_id|>), wrong for another vocabulary
            "pad_token_id": pad_token_id}
    for key in ("attention_bias", "rope_scaling", "head_dim"):  # not MllamaTextConfig's (head_dim: hidden / heads)
        text.pop(key)
    for key in ("bos_token_id", "eos_token_id"):  # MllamaTextConfig takes ids, not null: unknown ones unstated
        if text[key] is None:
            text.pop(key)
    if args.head_dim != args.dim // args.n_heads:
        raise UnsupportedArchitecture(f"head_dim {args.head_dim} is not hidden_size / heads, which "
                                      "MllamaTextConfig assumes")
    vision = {
        "model_type": "mllama_vision_model", "hidden_size": v.dim, "num_hidden_layers": v.n_layers,
        "num_global_layers": v.n_global_layers, "attention_heads": v.n_heads, "intermediate_size": v.hidden_dim,
        "image_size": v.image_size, "patch_size": v.patch_size, "max_num_tiles": v.max_num_tiles,
        # herd keeps transformers' meaning (the outputs of these layers), so the indices go out as read
        "intermediate_layers_indices": list(v.intermediate_layers),
        "supported_aspect_ratios": [list(r) for r in v.aspect_ratios], "norm_eps": v.norm_eps,
        "num_channels": v.n_channels, "vision_output_dim": v.output_dim, "hidden_act": "gelu",
    }
    return {"architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama",
            "image_token_index": v.image_token_id, "torch_dtype": "float32", "text_config": text,
            "vision_config": vision}


def _llama4_vision_config(args: ModelArgs, text: dict, image_tokens: dict) -> dict:
    v = args.vision
    vision = {
        "model_type": "llama4_vision_model", "hidden_size": v.dim, "num_hidden_layers": v.n_layers,
        "num_attention_heads": v.n_heads, "intermediate_size": v.hidden_dim, "image_size": v.image_size,
        "patch_size": v.patch_size, "num_channels": v.n_channels, "norm_eps": v.norm_eps,
        "pixel_shuffle_ratio": v.pixel_shuffle_ratio, "vision_output_dim": v.output_dim,
        "projector_input_dim": v.output_dim, "projector_output_dim": v.output_dim,
        "multi_modal_projector_bias": False, "hidden_act": "gelu", "vision_feature_select_strategy": "default",
        "rope_parameters": {"rope_type": "default", "rope_theta": v.rope_theta},
    }
    return {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
            "image_token_index": v.image_token_id, **image_tokens, "tie_word_embeddings": args.tie_embeddings,
            "torch_dtype": "float32", "text_config": {**text, "architectures": None}, "vision_config": vision}


def hf_config(args: ModelArgs, eos_token_ids=(), bos_token_id: int | None = None,
              image_tokens: dict | None = None) -> dict:
    """`image_tokens`: ids the tokenizer names (_image_tokens): Llama 4's boi/eoi_token_index, Llama 3.2
    Vision's pad_token_id."""
    eos = list(eos_token_ids)
    common = {
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "rope_scaling": _rope_config(args),
        "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "torch_dtype": "float32",
        "bos_token_id": bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
    }
    if args.cross_attention_layers:
        return _mllama_config(args, common, (image_tokens or {}).get("pad_token_id"))
    if args.is_llama4:
        text = _llama4_config(args, common)
        image_tokens = {k: v for k, v in (image_tokens or {}).items() if k != "pad_token_id"}
        return _llama4_vision_config(args, text, image_tokens) if args.vision is not None else text
    return {**common, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "intermediate_size": args.hidden_dim, "mlp_bias": False}


_TO_HF_VISION4 = {v: k for k, v in VISION_MAP.items()}
_TO_HF_VISION4_LAYER = {v: k for k, v in VISION_LAYER_MAP.items()}
_TO_HF_MLLAMA_VISION = {v: k for k, v in MLLAMA_VISION_MAP.items()}
_TO_HF_MLLAMA_LAYER = {v: k for k, v in MLLAMA_VISION_LAYER_MAP.items()}
_TO_HF_CROSS = {v: k for k, v in MLLAMA_CROSS_MAP.items()}
_MLLAMA_ENCODER = "vision_model.vision_encoder."


def _no_place(name: str, cls: str):
    return UnsupportedArchitecture(f"tensor {name} has no place in an HF {cls}")


def _llama4_vision_name(name: str) -> str:
    """herd's (Meta's) Llama 4 vision tensor name -> Llama4ForConditionalGeneration's (the inverse of
    herd.formats.hf.vision_tensor_name)."""
    if name == "vision_projection.weight":
        return "multi_modal_projector.linear_1.weight"
    key = name.removeprefix("vision_embeddings.")
    if key in _TO_HF_VISION4:
        return "vision_model." + _TO_HF_VISION4[key]
    prefix = "vision_encoder.transformer.resblocks."
    if key.startswith(prefix) and key.count(".") >= 5:
        index, rest = key[len(prefix):].split(".", 1)
        module, leaf = rest.rsplit(".", 1)
        if module in _TO_HF_VISION4_LAYER:
            return f"vision_model.model.layers.{index}.{_TO_HF_VISION4_LAYER[module]}.{leaf}"
    raise _no_place(name, "Llama4ForConditionalGeneration")


def _mllama_vision_tensor(name: str, t: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """herd's Llama 3.2 Vision encoder / projector tensor -> MllamaForConditionalGeneration's."""
    if name.startswith("vision_model.vision_projection."):
        return "multi_modal_projector." + name.rsplit(".", 1)[1], t
    key = name.removeprefix(_MLLAMA_ENCODER)
    v = args.vision
    if key == "conv1._linear.weight":  # Meta's unfold + linear is HF's convolution with the same weights
        return "vision_model.patch_embedding.weight", t.reshape(t.shape[0], v.n_channels, v.patch_size, v.patch_size)
    if key in _TO_HF_MLLAMA_VISION:
        return "vision_model." + _TO_HF_MLLAMA_VISION[key], t
    parts = key.split(".")
    if len(parts) >= 4 and parts[0] in ("transformer", "global_transformer") and parts[1] == "resblocks":
        rest = ".".join(parts[3:])
        module, _, leaf = rest.rpartition(".")
        hf = (_TO_HF_MLLAMA_LAYER[rest] if rest in _TO_HF_MLLAMA_LAYER
              else f"{_TO_HF_MLLAMA_LAYER[module]}.{leaf}" if module in _TO_HF_MLLAMA_LAYER else None)
        if hf is not None:
            return f"vision_model.{parts[0]}.layers.{int(parts[2])}.{hf}", t
    raise _no_place(name, "MllamaForConditionalGeneration")


def _mllama_tensors(tensors: dict[str, torch.Tensor], args: ModelArgs) -> dict:
    self_layers, cross = mllama_hf_layers(args)
    lm = "language_model.model."
    out = {}
    for name, t in tensors.items():
        if name.startswith("vision_model."):
            key, t = _mllama_vision_tensor(name, t, args)
        elif name == "tok_embeddings.weight":
            key = lm + "embed_tokens.weight"
        elif name == "norm.weight":
            key = lm + "norm.weight"
        elif name == "output.weight":
            if args.tie_embeddings:
                continue
            key = "language_model.lm_head.weight"
        elif name.startswith("cross_attention_layers."):
            _, k, rest = name.split(".", 2)
            if rest not in _TO_HF_CROSS:
                raise _no_place(name, "MllamaForConditionalGeneration")
            key = f"{lm}layers.{cross[int(k)]}.{_TO_HF_CROSS[rest]}"  # no RoPE here: q/k as they are
        else:
            _, layer, rest = name.split(".", 2)
            if rest not in _HERD_TO_HF:
                raise _no_place(name, "MllamaForConditionalGeneration")
            key = f"{lm}layers.{self_layers[int(layer)]}.{_HERD_TO_HF[rest]}"
            if rest == "attention.wq.weight":
                t = permute_for_rotate_half(t, args.n_heads)
            elif rest == "attention.wk.weight":
                t = permute_for_rotate_half(t, args.n_kv_heads)
        out[key] = t.contiguous()
    return out


def hf_tensors(tensors: dict[str, torch.Tensor], args: ModelArgs, dtype: torch.dtype | None = None) -> dict:
    if dtype is not None or any(t.device.type != "cpu" for t in tensors.values()):
        tensors = {k: t.detach().to(device="cpu", dtype=dtype) for k, t in tensors.items()}
    if args.cross_attention_layers:
        return _mllama_tensors(tensors, args)
    # Llama4ForConditionalGeneration nests the text model (Llama4ForCausalLM) as language_model
    text_prefix = "language_model." if args.is_llama4 and args.vision is not None else ""
    out, vision = {}, {}
    to_hf = _HERD_TO_HF4 if args.is_llama4 else _HERD_TO_HF
    experts: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        t = t.detach()
        if text_prefix and name.startswith(("vision_embeddings.", "vision_projection.")):
            vision[_llama4_vision_name(name)] = t.contiguous()
            continue
        if name == "tok_embeddings.weight":
            key = "model.embed_tokens.weight"
        elif name == "norm.weight":
            key = "model.norm.weight"
        elif name == "output.weight":
            if args.tie_embeddings:
                continue
            key = "lm_head.weight"
        else:
            _, layer, rest = name.split(".", 2)
            if args.is_llama4 and rest in _EXPERTS:
                experts.setdefault(layer, {})[rest.rsplit(".", 1)[1]] = t
                continue
            if rest not in to_hf:
                cls = "Llama4ForCausalLM" if args.is_llama4 else "LlamaForCausalLM"
                raise UnsupportedArchitecture(f"tensor {name} has no place in an HF {cls}")
            key = f"model.layers.{layer}.{to_hf[rest]}"
            if not args.is_llama4 and rest == "attention.wq.weight":
                t = permute_for_rotate_half(t, args.n_heads)
            elif not args.is_llama4 and rest == "attention.wk.weight":
                t = permute_for_rotate_half(t, args.n_kv_heads)
        out[key] = t.contiguous()
    out = {**{text_prefix + k: v for k, v in out.items()}, **vision}
    for layer, w in experts.items():  # herd: w1, w3 [E, F, D] and w2 [E, D, F], nn.Linear's [out, in] per expert
        if w.keys() != {"w1", "w2", "w3"}:
            raise UnsupportedArchitecture(f"layer {layer}: experts {sorted(w)} without the rest of w1, w2, w3")
        prefix = f"{text_prefix}model.layers.{layer}.feed_forward.experts."
        out[prefix + "gate_up_proj"] = torch.cat([w["w1"].transpose(1, 2), w["w3"].transpose(1, 2)], -1).contiguous()
        out[prefix + "down_proj"] = w["w2"].transpose(1, 2).contiguous()
    return out


def write_hf(out: str | Path, args: ModelArgs, tensors: dict[str, torch.Tensor], tokenizer: TokenizerSource | None,
             chat_template: str | None = None, eos_token_ids=(), lineage: dict | None = None,
             dtype: torch.dtype | None = None, tokenizer_json: tuple[str, dict] | None = None) -> Path:
    """An HF directory at `out` (new or empty). The tokenizer (write_tokenizer): a tokenizer.json is copied;
    any other comes as `tokenizer_json`, the text of the tokenizer.json that reproduces it and its
    tokenizer_config.json entries (herd.tokenizer.hf_files builds them; formats cannot)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FormatError(f"{out}: exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out, tokenizer, tokenizer_json, chat_template, model_dir="original")
    written = TokenizerSource("hf_json", out / "tokenizer.json") if (out / "tokenizer.json").is_file() else None
    bos = None
    if tokenizer is not None and tokenizer.gguf_metadata:
        bos = tokenizer.gguf_metadata.get("tokenizer.ggml.bos_token_id")
    elif written is not None:
        tok_config = read_json(out / "tokenizer_config.json") if (out / "tokenizer_config.json").is_file() else {}
        bos = _token_ids(written).get(_token_text(tok_config.get("bos_token")))
    config = hf_config(args, eos_token_ids, bos, _image_tokens(written))
    save_file(hf_tensors(tensors, args, dtype), str(out / "model.safetensors"), metadata={"format": "pt"})
    if args.vision is not None:
        for name, data in processor_files(args).items():
            (out / name).write_text(json.dumps(data, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if lineage is not None:
        (out / LINEAGE_FILE).write_text(json.dumps({"format": "herd-lineage", "lineage": lineage}, indent=2))
    return out


# what a converted tokenizer.json keeps of the source's tokenizer_config.json: the rest describes the source's
# own tokenizer class (its slow pipeline, legacy flags), which would rebuild the pipeline differently
_KEPT_WITH_CONVERSION = ("model_max_length", "padding_side", "truncation_side")


def write_tokenizer(out: Path, tokenizer: TokenizerSource | None, tokenizer_json: tuple[str, dict] | None,
                    chat_template: str | None, model_dir: str | None = None) -> None:
    """The tokenizer files of an HF (or Meta) directory: tokenizer.json, copied from an HF source or written
    from `tokenizer_json`; a SentencePiece or tiktoken tokenizer.model copied as it is (into `model_dir` for
    tiktoken, as Meta's HF repositories keep it in original/); tokenizer_config.json with the special tokens,
    BOS/EOS rules and the chat template."""
    source_config = {k: v for k, v in (tokenizer.config if tokenizer is not None else {}).items() if is_json(v)}
    if tokenizer_json is not None:
        text, facts = tokenizer_json
        (out / "tokenizer.json").write_text(text, encoding="utf-8")
        tok_config = {**{k: source_config[k] for k in _KEPT_WITH_CONVERSION if k in source_config}, **facts}
    else:
        tok_config = source_config
    if tokenizer is not None and tokenizer.path and tokenizer.kind in ("hf_json", "sentencepiece", "tiktoken"):
        target = out / ("tokenizer.json" if tokenizer.kind == "hf_json" else "tokenizer.model")
        if tokenizer.kind == "tiktoken" and model_dir and tokenizer_json is not None:
            (out / model_dir).mkdir(exist_ok=True)
            target = out / model_dir / "tokenizer.model"
        shutil.copyfile(tokenizer.path, target)
    if chat_template:
        tok_config["chat_template"] = chat_template
    if tok_config:
        (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False),
                                                   encoding="utf-8")


def _token_ids(tokenizer: TokenizerSource) -> dict:
    """A tokenizer.json's added tokens, text -> id ({} when it cannot be read: the ids then go unstated)."""
    try:
        added = json.loads(Path(tokenizer.path).read_text(encoding="utf-8")).get("added_tokens") or []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return {}
    return {a.get("content"): a.get("id") for a in added if isinstance(a, dict) and isinstance(a.get("id"), int)}


def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value


def _image_tokens(tokenizer: TokenizerSource | None) -> dict:
    """Llama 4's <|image_start|> / <|image_end|> ids as Llama4Config's boi/eoi_token_index, and Llama 3.2
    Vision's padding token, from a tokenizer.json that has them (herd's model never reads them; transformers'
    processor and trainer do)."""
    if tokenizer is None or tokenizer.kind != "hf_json" or not tokenizer.path:
        return {}
    ids = _token_ids(tokenizer)
    found = {"boi_token_index": ids.get("<|image_start|>"), "eoi_token_index": ids.get("<|image_end|>"),
             "pad_token_id": ids.get("<|finetune_right_pad_id|>")}
    return {k: v for k, v in found.items() if isinstance(v, int)}


def processor_files(args: ModelArgs) -> dict[str, dict]:
    """preprocessor_config.json and processor_config.json stating the image preprocessing herd does
    (herd.images, with the settings the model was read with), so that transformers' processor, and herd
    reading the export back, prepare images alike."""
    v = args.vision
    common = {"size": {"height": v.image_size, "width": v.image_size}, "do_resize": True, "do_rescale": True,
              "rescale_factor": v.rescale_factor, "do_normalize": True, "do_convert_rgb": True, "resample": 2,
              "image_mean": list(v.image_mean), "image_std": list(v.image_std)}
    if args.cross_attention_layers:
        return {"preprocessor_config.json": {
                    "image_processor_type": "MllamaImageProcessor", **common, "max_image_tiles": v.max_num_tiles,
                    "do_pad": True, "processor_class": "MllamaProcessor"},
                "processor_config.json": {"processor_class": "MllamaProcessor"}}
    return {"preprocessor_config.json": {
                "image_processor_type": "Llama4ImageProcessor", **common, "max_patches": v.max_tiles,
                "resize_to_max_canvas": v.resize_to_max_canvas, "processor_class": "Llama4Processor"},
            "processor_config.json": {"processor_class": "Llama4Processor", "patch_size": v.patch_size,
                                      "pixel_shuffle_ratio": v.pixel_shuffle_ratio}}


def read_lineage(path: str | Path) -> dict | None:
    """The lineage record of an HF export or adapter directory (herd.json), if it has one."""
    marker = Path(path) / LINEAGE_FILE
    if not Path(path).is_dir() or not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data.get("lineage") if isinstance(data, dict) and data.get("format") == "herd-lineage" else None


__all__ = ["write_hf", "write_tokenizer", "hf_config", "hf_tensors", "read_lineage", "LINEAGE_FILE"]
