"""Checkpoint -> this rank's share of a tensor- and expert-parallel model: the loader's plan for a
torchrun job (herd.load(tp=, ep=)). Each parameter is read as the rows or columns the layout gives this rank
(herd.transforms.tensor_parallel describes the layout; herd.formats.slices reads the slices from the
memory-mapped files without the rest), then the modules are swapped for their parallel forms. Llama 4's image
encoder and projector are read whole on every rank (replicated: rank 0 runs them, see
herd.transforms.tensor_parallel).
"""

from __future__ import annotations

import torch
from torch import nn

from herd.errors import HerdError, ShapeMismatch
from herd.formats.slices import read_slice
from herd.loader import _finish, _skeleton, default_dtype
from herd.model import Transformer
from herd.transforms.tensor_parallel import VISION_PREFIXES, Layout, check_layout, parallelize


def _param(t: torch.Tensor, device) -> nn.Parameter:
    return nn.Parameter(t.to(device), requires_grad=False)


def _set(module: nn.Module, attr: str, tensor: torch.Tensor, device) -> None:
    module._parameters[attr] = _param(tensor, device)
    if attr != "weight":  # a bias (the image encoder's linears have them) says nothing of the sizes
        return
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = tensor.shape
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = tensor.shape


def load_parallel(checkpoint, layout: Layout, device: torch.device, dtype: torch.dtype | None) -> Transformer:
    """This rank's share of the checkpoint as a sharded model (see the module docstring)."""
    args = checkpoint.args
    if args.cross_attention_layers:
        raise HerdError(f"{checkpoint.path}: Llama 3.2 Vision's cross-attention layers are not split over ranks; "
                        "run this model in one process (without --tp/--ep)")
    check_layout(args, layout.tp, layout.ep, layout.world, str(checkpoint.path))
    dtype = dtype or default_dtype(checkpoint, device)
    model, expected = _skeleton(checkpoint)
    tensors, tp = checkpoint.tensors, layout.tp
    hd = args.head_dim
    q_lo, q_hi = layout.share(args.n_heads, tp)
    if args.n_kv_heads % tp == 0:
        kv_lo, kv_hi = layout.share(args.n_kv_heads, tp)
    else:  # fewer KV heads than ranks: the KV head of this rank's query heads, replicated
        kv_lo = layout.rank * args.n_kv_heads // tp
        kv_hi = kv_lo + 1
    v_lo, v_hi = layout.share(args.vocab_size, tp)
    f_lo, f_hi = layout.share(args.hidden_dim, tp)
    if args.moe is not None:
        e_lo, e_hi = layout.share(args.moe.num_experts, layout.ep)
        m_lo, m_hi = layout.share(args.moe.hidden_dim, tp if layout.ep == 1 else 1)
        s_lo, s_hi = layout.share(args.moe.hidden_dim, tp)

    def plan(name: str) -> tuple[int, int, int] | None:
        """(dim, start, stop) of this rank's share of tensor `name`, None for the whole."""
        if name.startswith(VISION_PREFIXES):  # Llama 4's image encoder: whole on every rank (see the module doc)
            return None
        if name == "tok_embeddings.weight" or name == "output.weight":
            return (0, v_lo, v_hi) if tp > 1 else None
        short = name.split(".", 2)[-1]
        if short == "attention.wq.weight":
            return 0, q_lo * hd, q_hi * hd
        if short in ("attention.wk.weight", "attention.wv.weight"):
            return 0, kv_lo * hd, kv_hi * hd
        if short == "attention.wo.weight":
            return 1, q_lo * hd, q_hi * hd
        if short in ("feed_forward.w1.weight", "feed_forward.w3.weight"):
            return 0, f_lo, f_hi
        if short == "feed_forward.w2.weight":
            return 1, f_lo, f_hi
        if short in ("feed_forward.shared_expert.w1.weight", "feed_forward.shared_expert.w3.weight"):
            return 0, s_lo, s_hi
        if short == "feed_forward.shared_expert.w2.weight":
            return 1, s_lo, s_hi
        if short in ("feed_forward.experts.w1", "feed_forward.experts.w3", "feed_forward.experts.w2"):
            return (0, e_lo, e_hi) if layout.ep > 1 else ((2 if short.endswith("w2") else 1), m_lo, m_hi)
        return None  # norms, routers

    for name in expected:
        source = tensors[name]
        share = plan(name)
        if share is None:
            tensor = read_slice(source, 0, 0, source.shape[0], dtype)
        else:
            tensor = read_slice(source, *share, dtype)
            if tensor.shape[share[0]] != share[2] - share[1]:
                raise ShapeMismatch(f"{checkpoint.path}: {name}: read {tuple(tensor.shape)} for rows {share}")
        if share is not None and share[0] == 2:  # a 3-D slice along the last dim is copied: keep it compact
            tensor = tensor.contiguous()
        module_name, _, attr = name.rpartition(".")
        _set(model.get_submodule(module_name), attr, tensor, device)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    parallelize(model, layout, args, kv_hi - kv_lo)
    return _finish(model, checkpoint, device)


def load_distributed(checkpoint, tp: int, ep: int, device, dtype) -> Transformer:
    """Join the torchrun job (herd.distributed.init), load this rank's share, and on rank 0 attach the
    Leader that describes each forward to the other ranks."""
    from herd import distributed

    device = distributed.init(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    rank, world = distributed.rank(), distributed.world_size()
    model = load_parallel(checkpoint, Layout(tp, ep, rank, world), device, dtype)
    if rank == 0:
        model.leader = distributed.Leader()
    return model


__all__ = ["load_parallel", "load_distributed"]
