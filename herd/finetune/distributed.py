"""Full fine-tuning sharded over processes with PyTorch's FSDP2 (`fully_shard`): parameters, gradients and
optimizer state are split across the processes of the torch.distributed group, and each decoder block's
parameters are gathered only while it runs (forward and backward), so a model larger than one process's
memory trains across several.

The training forward (herd.finetune.forward) calls the embedding, blocks, norm and output one by one rather
than through Transformer.forward, so the loss is wrapped in one module, Objective, which is the FSDP root:
its unit holds the embedding, final norm and output (tied or not) and each block is a unit of its own.
FSDP2 averages gradients over processes; herd's loss is a sum over the global batch divided by its target
count, so the loss is multiplied by the number of processes to make the average that sum. Other passes
over the sharded model (DPO's reference log-probabilities) go through Objective too, with their own function."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class Objective(nn.Module):
    def __init__(self, model: nn.Module, loss: Callable):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch, fn: Callable | None = None):
        """The loss of `batch`, or `fn(model, batch)`: anything that runs the model must come through here,
        so that FSDP gathers the root unit's parameters (embedding, norm, output) around it."""
        return (fn or self.loss)(self.model, batch)


def shard_for_training(model: nn.Module, loss: Callable) -> Objective:
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer)
    objective = Objective(model, loss)
    fully_shard(objective)
    return objective


def full_state(objective: Objective, optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state as whole tensors on the CPU of rank 0 (a collective: every process calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(objective, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(objective: Objective, optimizer, model_state: dict, optim_state: dict) -> None:
    """Rank 0's whole tensors back into the shards of every process (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(objective, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def as_local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective), anything else as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


__all__ = ["Objective", "shard_for_training", "full_state", "load_full_state", "as_local"]
