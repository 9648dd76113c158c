"""Checkpoint → Transformer: build on the meta device, check every tensor, assign it once, then apply the
backend's load-time transforms (herd.transforms), which swap modules of the plain model.

Two plans:
- dense: every tensor becomes a parameter of the compute dtype. Parameters are assigned (not copied) where
  dtype and device already match, so a memory-mapped checkpoint needs no second copy. GGML blocks are
  dequantized here; `dtype=torch.float32` is the exact reference path the parity tests use.
- quantized (CPU; the default for quantized GGUF files and `herd quantize` output): weights stay quantized.
  Linear layers become herd.quant.linear modules (int4 for Q4_0/Q4_1/Q4_K, int8 per channel for herd q8,
  else a bf16 Linear: Q8_0, Q5_K, Q6_K, F16), q/k/v and gate/up are fused into one matmul each, and the embedding keeps its stored rows.
  An image model's encoder, projector and cross-attention linears take the same modules where quantized
  (biases added in fp32); where the file stores them as floats they compute in fp32 (keep_float_linears).
  Matmuls take bf16 inputs (the only activation dtype the CPU kernels vectorise); the residual stream,
  norms, RoPE, attention (and its KV cache) stay fp32, and logits are returned as fp32.
On the CPU both end with herd.transforms.cpu_kernels (herd's C++ ops where they apply). A quantized model's
repacked layout is cached (herd.layout_cache), so only the first load of a file pays for the repacking.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from herd.config import layer_plan
from herd.errors import HerdError, MissingTensor, ShapeMismatch, UnexpectedTensor
from herd.formats.checkpoint import Checkpoint
from herd.formats.fields import check_layer_count
from herd.model import Transformer
from herd.model.rope import inverse_frequencies
from herd.quant import GGMLTensor, Int4Weight, Int8Weight, QuantizedWeight
from herd.quant.ggml import GGMLType


def _is_quantized(t) -> bool:
    if isinstance(t, GGMLTensor):
        return t.ggml_type not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
    return isinstance(t, (Int4Weight, Int8Weight))


def default_dtype(checkpoint: Checkpoint, device: torch.device) -> torch.dtype:
    """The compute dtype when the caller names none: what the file stores, where the device runs it well."""
    stored = {t.dtype for t in checkpoint.tensors.values() if isinstance(t, torch.Tensor) and t.dim() > 1}
    if device.type == "cpu":
        return torch.bfloat16 if stored == {torch.bfloat16} else torch.float32
    return torch.float32 if stored == {torch.float32} else torch.bfloat16


def use_quantized(checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype | None) -> bool:
    """herd's default: keep weights quantized when the file is quantized, the device is the CPU and the
    caller asked for no dtype or bf16 (float32 asks for the exact dequantized path)."""
    return (device.type == "cpu" and dtype in (None, torch.bfloat16)
            and any(_is_quantized(t) for t in checkpoint.tensors.values()))


def load_model(
    checkpoint: Checkpoint,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
    quantized: bool | None = None,
) -> Transformer:
    """`quantized`: None chooses (see use_quantized); True insists on the quantized CPU path; False dequantizes;
    "trainable" keeps weights as stored under modules that backpropagate (QLoRA: load_trainable_quantized)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if quantized == "trainable":
        if device.type != "cpu":
            raise HerdError(f"the trainable quantized base runs on the CPU only, not {device}")
        return load_trainable_quantized(checkpoint, dtype or torch.float32)
    if quantized is None:
        quantized = use_quantized(checkpoint, device, dtype)
    if quantized:
        if device.type != "cpu":
            raise HerdError(f"the quantized path runs on the CPU only; load on {device} with quantized=False")
        if dtype not in (None, torch.bfloat16):
            raise HerdError(f"the quantized CPU kernels compute in bfloat16, not {dtype}; pass quantized=False "
                            "for a dequantized model of that dtype")
        from herd import layout_cache

        def fits(model) -> bool:
            return isinstance(model, Transformer) and model.args == checkpoint.args

        companions = [checkpoint.projector] if checkpoint.projector is not None else []
        return layout_cache.load_or_build(checkpoint.path, lambda: _load_quantized(checkpoint, progress), fits,
                                          companions)
    dtype = dtype or default_dtype(checkpoint, device)
    model, expected = _skeleton(checkpoint)
    state = {}
    for i, (name, param) in enumerate(expected.items()):
        source = checkpoint.tensors[name]
        tensor = source.dequantize(dtype) if isinstance(source, QuantizedWeight) else source
        state[name] = tensor.to(device=device, dtype=dtype)
        if progress:
            progress(i + 1, len(expected))
    # Every name was checked; strict=False only because a tied output.weight shares tok_embeddings.
    model.load_state_dict(state, strict=False, assign=True)
    if checkpoint.args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model = _finish(model, checkpoint, device)
    if device.type == "cpu" and dtype == torch.float32:  # herd's small CPU ops compute in fp32
        from herd.transforms.cpu_kernels import use_cpu_kernels

        model = use_cpu_kernels(model)
    return model


def _check_sizes(checkpoint: Checkpoint) -> None:
    """What building the skeleton costs is set by the config (layers, widths, head size): check it against
    the tensors first, so that a header claiming 2^31 layers or a 2^40-wide head fails at once."""
    args, tensors, path = checkpoint.args, checkpoint.tensors, checkpoint.path
    check_layer_count(args.n_layers, tensors, r"layers\.(\d+)\.", path, "n_layers")
    wants = {
        "tok_embeddings.weight": (args.vocab_size + args.extra_embeddings, args.dim),
        "layers.0.attention.wq.weight": (args.n_heads * args.head_dim, args.dim),
        "layers.0.attention.wk.weight": (args.n_kv_heads * args.head_dim, args.dim),
    }
    plan = layer_plan(args)
    dense = next((i for i, spec in enumerate(plan) if not spec.moe), None)
    if dense is not None:
        wants[f"layers.{dense}.feed_forward.w1.weight"] = (args.hidden_dim, args.dim)
    moe = next((i for i, spec in enumerate(plan) if spec.moe), None)
    if moe is not None:
        wants[f"layers.{moe}.feed_forward.experts.w1"] = (args.moe.num_experts, args.moe.hidden_dim, args.dim)
    for name, shape in wants.items():
        if name not in tensors:
            raise MissingTensor(f"{path}: missing tensor {name}")
        if tuple(tensors[name].shape) != shape:
            raise ShapeMismatch(f"{path}: {name} has shape {tuple(tensors[name].shape)}, the config implies {shape}")


def _skeleton(checkpoint: Checkpoint) -> tuple[Transformer, dict[str, nn.Parameter]]:
    """The model on the meta device, after checking the checkpoint names every parameter with its shape."""
    _check_sizes(checkpoint)
    try:
        with torch.device("meta"), _no_init():
            model = Transformer(checkpoint.args)
    except (RuntimeError, TypeError, ValueError) as e:  # a size the checks above miss and torch cannot represent
        raise ShapeMismatch(f"{checkpoint.path}: the config's sizes cannot be built ({e})") from None
    expected = {name: p for name, p in model.named_parameters()}  # a tied output appears once, as tok_embeddings
    tensors = checkpoint.tensors
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise MissingTensor(f"{checkpoint.path}: missing {len(missing)} tensor(s), e.g. {missing[:4]}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise UnexpectedTensor(f"{checkpoint.path}: tensor(s) with no place in this architecture: {unexpected[:4]}")
    for name, param in expected.items():
        shape = tuple(tensors[name].shape)
        if shape != tuple(param.shape):
            raise ShapeMismatch(f"{checkpoint.path}: {name} has shape {shape}, the config implies {tuple(param.shape)}")
    return model, expected


@contextlib.contextmanager
def _no_init():
    """Skip random initialisation while building on "meta": every value is assigned from the checkpoint,
    and meta-device normal_() would import torch._dynamo (over a second and tens of MB)."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def check_vocabulary(checkpoint: Checkpoint, tokenizer) -> None:
    """Every id the tokenizer can produce must have an embedding row. More rows than tokens is common
    (HF checkpoints pad the embedding to a round size): the model computes logits for them, as transformers
    does, and sampling never picks them (herd.engine.runner, ModelRunner.generable)."""
    rows, n = checkpoint.args.vocab_size + checkpoint.args.extra_embeddings, tokenizer.vocab_size
    if n > rows:
        raise ShapeMismatch(
            f"{checkpoint.path}: the tokenizer has {n} tokens, but the embedding has {rows} rows; "
            f"ids {rows}..{n - 1} would have no embedding"
        )


def _finish(model: Transformer, checkpoint: Checkpoint, device: torch.device) -> Transformer:
    model.inv_freq = inverse_frequencies(checkpoint.args).to(device)  # buffers built on "meta" hold no values
    if checkpoint.args.vision is not None and not checkpoint.args.cross_attention_layers:
        from herd.model.vision import vision_rope_angles

        model.vision_embeddings.vision_encoder.rot = vision_rope_angles(checkpoint.args.vision).to(device)
    return model.eval().requires_grad_(False)


# ---- the quantized CPU path ------------------------------------------------------------------------------


def _load_quantized(checkpoint: Checkpoint, progress) -> Transformer:
    """The plan for quantized weights on the CPU: fuse q/k/v and gate/up where the parts share one module,
    quantize the remaining linears (herd.transforms.quantize's schemes), keep the embedding's stored rows,
    then swap in herd's CPU kernels (herd.transforms.cpu_kernels)."""
    from herd.quant.linear import COMPUTE_DTYPE, PackedLinear, QuantEmbedding, RefinedLogits
    from herd.transforms.cpu_kernels import use_cpu_kernels
    from herd.transforms.fuse import fuse_projections
    from herd.transforms.quantize import can_share_one_module, quantize_linears, quantized_linear

    model, expected = _skeleton(checkpoint)
    tensors, tied = checkpoint.tensors, checkpoint.args.tie_embeddings

    def stacked(names: list[str]):
        sources = [tensors[n] for n in names]
        return quantized_linear(sources) if can_share_one_module(sources) else None

    fuse_projections(model, stacked)
    keep_float_linears(model, tensors)
    quantize_linears(model, tensors, tied, progress)
    # Tied to an output in herd's packed layout: look rows up there (the file's map can then go).
    tied_packed = tied and isinstance(model.output, PackedLinear)
    model.tok_embeddings = QuantEmbedding(model.output if tied_packed else tensors["tok_embeddings.weight"], torch.float32)
    out_source = tensors["tok_embeddings.weight" if tied else "output.weight"]
    # A bf16 or int4pack output rounds logits ~0.1 apart: near-ties of the top ones are decided in fp32 from
    # the stored rows. herd's kernels (fp32 out, ~15-bit activations) need no such help.
    if _is_quantized(out_source) and not isinstance(model.output, PackedLinear):
        rows = model.tok_embeddings if tied else QuantEmbedding(out_source, torch.float32)
        model.output = RefinedLogits(model.output, rows)
    # What is left: norm weights (fp32, like the residual stream), Llama 4's stacked experts (bf16), and an
    # image encoder's own tensors (class and position embeddings, tile embeddings, gates: fp32, as the
    # encoder's activations, which meet the linears' kernels only as their inputs).
    state = {}
    for name in expected:
        if name.startswith("tok_embeddings.") or not _has_param(model, name):
            continue
        source = tensors[name]
        dtype = torch.float32 if len(source.shape) == 1 or name.startswith(_IMAGE_PARTS) else COMPUTE_DTYPE
        # a copy: tiny, and a view of the file map would alias its neighbours (torch.compile refuses that)
        state[name] = source.dequantize(dtype) if isinstance(source, QuantizedWeight) else source.to(dtype, copy=True)
    model.load_state_dict(state, strict=False, assign=True)
    model = use_cpu_kernels(_finish(model, checkpoint, torch.device("cpu")))
    # Keys and values in fp16, as llama.cpp keeps them: half the memory of fp32, and herd's decode kernel
    # widens them exactly, so greedy outputs stay those of fp32 keys (16 SmolLM2 prompts x 160 tokens, all
    # identical; bf16's 8-bit mantissa changed 4 of 16 within 64 tokens). The fp32 reference path keeps fp32.
    model.kv_dtype = torch.float16
    return model


_IMAGE_PARTS = ("vision_embeddings.", "vision_projection", "vision_model.", "cross_attention_layers.")


def _stored_bias(tensors: dict, name: str, module: nn.Module) -> torch.Tensor | None:
    """The file's bias of linear `name` (float32 if it was stored quantized), or None where it has none."""
    if module.bias is None:
        return None
    stored = tensors[f"{name}.bias"]
    return stored.dequantize(torch.float32) if isinstance(stored, QuantizedWeight) else stored


def keep_float_linears(model: Transformer, tensors: dict) -> int:
    """Linears whose file stores float weights become FloatLinear (fp32 over the stored weights) where bf16
    costs more than it saves: an image encoder's (herd.quant.linear.FloatLinear says why) and Llama 4's MoE
    routers, whose top-k choice is discrete: bf16 routing logits chose another expert than fp32 for 1 token
    of 106 in tests/test_vision_gguf.py (0.57 relative error in its logits), for an E x D matrix's worth of
    memory. Quantized ones are left for the packed kernels."""
    from herd.quant.linear import FloatLinear
    from herd.transforms import replace_modules

    def build(name: str, module: nn.Module):
        wanted = name.startswith(_IMAGE_PARTS) or name.endswith(".feed_forward.router")
        if not (wanted and isinstance(module, nn.Linear) and module.weight.is_meta):
            return None
        weight = tensors[f"{name}.weight"]
        if not isinstance(weight, torch.Tensor):
            return None
        return FloatLinear(weight, _stored_bias(tensors, name, module))

    return replace_modules(model, build)


def use_int8_prompts(model: Transformer) -> int:
    """The opt-in prompt transform (herd.transforms.prompt_int8); the number of linears it changed."""
    from herd.transforms.prompt_int8 import use_int8_prompts as transform

    return transform(model)


def _has_param(model: nn.Module, name: str) -> bool:
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return False
    return attr in module._parameters and module._parameters[attr] is not None and module._parameters[attr].is_meta


# ---- adapters ----------------------------------------------------------------------------------------------


def apply_adapter(model: Transformer, adapter: str | Path, args) -> dict:
    """Wrap the model's projections named by a PEFT LoRA adapter directory and load its A and B
    (herd.transforms.lora; herd.formats.peft reads the files), over a base of any format loaded dense.
    Returns the adapter's settings."""
    from herd.formats.peft import read_adapter
    from herd.transforms.lora import LoRALinear, load_lora_weights
    from herd.transforms import replace_modules

    settings, tensors = read_adapter(adapter, args)
    wanted = set(settings["modules"])
    if any(n.endswith((".wqkv", ".w13")) or type(m).__name__ == "KernelBlock" for n, m in model.named_modules()):
        # the quantized plan fuses q/k/v and gate/up and runs whole decoder blocks as one op
        raise HerdError(f"{adapter}: an adapter needs the base loaded with separate projections: "
                        "load with quantized=False")

    def build(name: str, module):
        if name in wanted:
            return LoRALinear(module, settings["rank"], settings["alpha"], 0.0)
        return None

    replaced = replace_modules(model, build)
    if replaced != len(wanted):
        missing = sorted(wanted - {n for n, m in model.named_modules() if isinstance(m, LoRALinear)})
        raise HerdError(f"{adapter}: the model has no module {missing[:3]} for the adapter's weights")
    load_lora_weights(model, tensors)
    model.requires_grad_(False)
    import hashlib

    settings["path"] = str(adapter)
    settings["sha256"] = hashlib.sha256((Path(adapter) / "adapter_model.safetensors").read_bytes()).hexdigest()
    return settings


def apply_adapters(model: Transformer, adapters: dict[str, str | Path], args) -> dict[str, dict]:
    """Several PEFT LoRA adapters over one dense base, each request choosing its own
    (herd.transforms.lora.use_adapters; request adapter i is the i-th of `adapters`, in order). Returns
    {name: settings} with each adapter file's SHA-256."""
    import hashlib

    from herd.formats.peft import read_adapter
    from herd.transforms.lora import use_adapters

    if any(n.endswith((".wqkv", ".w13")) or type(m).__name__ == "KernelBlock" for n, m in model.named_modules()):
        raise HerdError("adapters need the base loaded with separate projections: load with quantized=False")
    modules = {n for n, _ in model.named_modules()}
    deltas, out = [], {}
    for name, path in adapters.items():
        settings, tensors = read_adapter(path, args)
        scaling = settings["alpha"] / settings["rank"]
        delta = {}
        for module in settings["modules"]:
            if module not in modules:
                raise HerdError(f"{path}: the model has no module {module} for the adapter's weights")
            delta[module] = (tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"], scaling)
        deltas.append(delta)
        settings["path"] = str(path)
        settings["sha256"] = hashlib.sha256((Path(path) / "adapter_model.safetensors").read_bytes()).hexdigest()
        out[name] = settings
    use_adapters(model, deltas)
    model.requires_grad_(False)
    return out


def load_trainable_quantized(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32) -> Transformer:
    """The plan for QLoRA: every linear a BlockDequantLinear over its stored weight (herd.transforms.qlora),
    the embedding looked up row by row from its stored form (a tied output reads the same blocks), and
    only norms (and Llama 4's stacked experts) in `dtype`. Nothing is fused, so LoRA can wrap any projection."""
    from herd.quant.linear import QuantEmbedding
    from herd.transforms import replace_modules
    from herd.transforms.qlora import BlockDequantLinear

    model, expected = _skeleton(checkpoint)
    tensors, tied = checkpoint.tensors, checkpoint.args.tie_embeddings

    def build(name: str, module: nn.Module):
        if isinstance(module, nn.Linear) and module.weight.is_meta:
            return BlockDequantLinear(tensors["tok_embeddings.weight" if name == "output" and tied else f"{name}.weight"],
                                      dtype, _stored_bias(tensors, name, module))
        return None

    replace_modules(model, build)
    model.tok_embeddings = QuantEmbedding(tensors["tok_embeddings.weight"], dtype)
    if isinstance(model.tok_embeddings.q, torch.Tensor) and model.tok_embeddings.dense:
        model.tok_embeddings.q = tensors["tok_embeddings.weight"].to(dtype)  # a float table: no bf16 rounding
    state = {}
    for name in expected:
        if name.startswith("tok_embeddings.") or not _has_param(model, name):
            continue
        source = tensors[name]
        state[name] = source.dequantize(dtype) if isinstance(source, QuantizedWeight) else source.to(dtype, copy=True)
    model.load_state_dict(state, strict=False, assign=True)
    return _finish(model, checkpoint, torch.device("cpu"))
