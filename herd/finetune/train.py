"""The training loop: AdamW, gradient accumulation, warmup + cosine, clipping, eval loss, exact resume.

One optimizer step takes `grad_accum` micro-batches of `batch_size` rows on each process. The loss of a step
is the sum over its targets divided by the number of targets in the whole step (every micro-batch of every
process), which is what one large batch would give: accumulation and data parallelism change nothing but
the summation order. Under torch.distributed every process holds the whole model and the gradients are
summed with all_reduce before the step (full fine-tuning can shard instead: herd.finetune.distributed).

The data order depends only on the seed (herd.finetune.data.epoch_order), so a checkpoint records its place
as the step number; with the weights, the optimizer and scheduler states and the RNG state, a resumed run
continues exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import time
from pathlib import Path
from typing import Callable

import torch

from herd.errors import ConfigError, TrainingDiverged
from herd.finetune.config import TrainConfig
from herd.finetune.data import IGNORE, Row, TensorBatch, collate, epoch_order
from herd.finetune.forward import loss_sum


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup from 0, then cosine decay to 0 at `total` (HF's get_cosine_schedule_with_warmup)."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


class Trainer:
    """Supervised fine-tuning on packed rows; DPOTrainer (herd.finetune.dpo) changes the items and the loss."""

    def __init__(self, model, config: TrainConfig, items: list, eval_items: list | None = None, pad_id: int = 0,
                 device: torch.device | None = None, shard: bool = False):
        """`shard`: under torch.distributed, split parameters, gradients and optimizer state over the processes
        with FSDP2 (herd.finetune.distributed; full fine-tuning); otherwise every process holds the model."""
        self.model, self.config, self.items, self.eval_items = model, config, items, eval_items or []
        self.pad_id = pad_id
        self.device = device or torch.device("cpu")
        dist = _dist()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
        self.objective = None
        if shard and dist:
            from herd.finetune.distributed import shard_for_training

            self.objective = shard_for_training(model, lambda m, b: self.loss_of(m, b))
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named_params:
            raise ValueError("nothing to train: no parameter requires a gradient")
        self.params = [p for _, p in self.named_params]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=config.betas, eps=config.adam_eps,
                                           weight_decay=config.weight_decay)
        per_step = config.batch_size * self.world * config.grad_accum
        self.steps_per_epoch = max(1, math.ceil(len(items) / per_step))
        if config.steps is not None:
            self.total_steps = config.steps
        else:
            self.total_steps = max(1, math.ceil((config.epochs or 1.0) * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, config.warmup_steps, self.total_steps, config.schedule))
        self.step = 0
        self.history: dict[str, list] = {"train": [], "eval": []}
        self._orders: dict[int, list[int]] = {}
        self.tokens_seen = 0

    # ---- data ---------------------------------------------------------------------------------------
    def _item_index(self, k: int) -> int:
        n = len(self.items)
        epoch = k // n
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(n, self.config.seed, epoch)}
        return self._orders[epoch][k % n]

    def micro_batch_items(self, step: int, micro: int) -> list:
        """This process's items of micro-batch `micro` of optimizer step `step`."""
        c = self.config
        width = c.batch_size * self.world
        first = (step * c.grad_accum + micro) * width
        return [self.items[self._item_index(k)] for k in range(first + self.rank, first + width, self.world)]

    def make_batch(self, items: list[Row]) -> TensorBatch:
        return collate(items, self.pad_id).to(self.device)

    def count(self, batch: TensorBatch) -> int:
        """What the step's loss is averaged over: trained tokens."""
        return batch.n_targets

    def batch_tokens(self, batch) -> int:
        return int((batch.segments >= 0).sum())

    def loss_of(self, model, batch) -> torch.Tensor:
        """The summed loss of one micro-batch."""
        return loss_sum(model, batch, self.config.activation_checkpointing)

    def loss(self, batch) -> torch.Tensor:
        return self.apply(self.loss_of, batch)

    def apply(self, fn: Callable, batch):
        """fn(model, batch), through the FSDP root when sharded (a collective: every process calls it)."""
        if self.objective is not None:
            return self.objective(batch, fn)
        return fn(self.model, batch)

    # ---- one step -----------------------------------------------------------------------------------
    def autocast(self):
        if self.config.dtype == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, batches: list) -> float:
        """Gradients of the step's mean loss over `batches` (this process's micro-batches); returns that loss."""
        dist = _dist()
        count = torch.tensor(float(sum(self.count(b) for b in batches)))
        if dist:
            dist.all_reduce(count)
        total = torch.zeros(())
        self.model.train()
        # FSDP averages gradients over processes: scaled by their number, the average is the global sum
        scale = self.world if self.objective is not None else 1
        for batch in batches:
            with self.autocast():
                loss = self.loss(batch) / max(count.item(), 1.0)
            (loss * scale).backward()
            total += loss.detach().float().cpu()
            self.tokens_seen += self.batch_tokens(batch) * self.world
        if dist:
            dist.all_reduce(total)
        if dist and self.objective is None:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
        return float(total)

    def train_step(self) -> dict:
        """One optimizer step. A loss or gradient that is not finite (a learning rate or LoRA scale too large,
        overflow in bfloat16) stops the run before the optimizer applies it: TrainingDiverged, the weights as
        they were after the last good step."""
        from herd.finetune.distributed import as_local

        c = self.config
        batches = [self.make_batch(self.micro_batch_items(self.step, m)) for m in range(c.grad_accum)]
        loss = self.backward(batches)
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"step {self.step + 1}: the loss is {loss} (lr {c.lr:g}, lora_alpha "
                                   f"{c.lora_alpha:g}): training diverged; lower --lr, or check the data and settings")
        # the norm is measured on every step (clip_grad_norm_ with no limit only measures it)
        grad_norm = float(as_local(torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm or float("inf"))))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"step {self.step + 1}: the gradient norm is {grad_norm} (loss {loss:.4f}): "
                                   "training diverged; lower --lr, or check the data and settings")
        if not c.max_grad_norm:
            grad_norm = None
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm}
        self.history["train"].append(record)
        return record

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the eval items (every process sees its share; the sums are all-reduced)."""
        if not self.eval_items:
            return None
        self.model.eval()
        c, dist = self.config, _dist()
        total, count = torch.zeros(()), torch.zeros(())
        mine = self.eval_items[self.rank::self.world]
        # sharded, every process must run as many forwards as the others (FSDP's collectives): one short of
        # a batch evaluates a spare one and does not count it
        rounds = math.ceil(math.ceil(len(self.eval_items) / self.world) / c.batch_size)
        if self.objective is None:
            rounds = math.ceil(len(mine) / c.batch_size)
        for r in range(rounds):
            chunk = mine[r * c.batch_size:(r + 1) * c.batch_size]
            batch = self.make_batch(chunk or self.eval_items[:1])
            with self.autocast():
                loss = self.loss(batch).float().cpu()
            if chunk:
                total += loss
                count += self.count(batch)
        if dist:
            dist.all_reduce(total)
            dist.all_reduce(count)
        value = float(total / count.clamp(min=1))
        self.history["eval"].append({"step": self.step, "loss": value})
        return value

    # ---- checkpoints --------------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything a resumed run needs (under FSDP a collective: whole tensors gathered on rank 0)."""
        if self.objective is not None:
            from herd.finetune.distributed import full_state

            trainable, optimizer = full_state(self.objective, self.optimizer)
        else:
            trainable, optimizer = {n: p.detach().clone() for n, p in self.named_params}, self.optimizer.state_dict()
        return {
            "trainable": trainable,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "rng": torch.get_rng_state(),
            "history": json.dumps(self.history),
            "tokens_seen": self.tokens_seen,
            "config": json.dumps(self.config.to_dict()),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = self.state()  # on every process: under FSDP it gathers
        if self.rank == 0:
            torch.save(state, path / "trainer.pt")
        return path

    def load(self, path: str | Path) -> None:
        try:
            state = torch.load(Path(path) / "trainer.pt", map_location="cpu", weights_only=True)
        except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
            raise ConfigError(f"{Path(path) / 'trainer.pt'}: not a checkpoint herd can resume from "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if not isinstance(state, dict) or not {"trainable", "optimizer", "scheduler", "step"} <= set(state):
            raise ConfigError(f"{Path(path) / 'trainer.pt'}: not a herd fine-tuning checkpoint")
        if self.objective is not None:
            from herd.finetune.distributed import load_full_state

            load_full_state(self.objective, self.optimizer, state["trainable"], state["optimizer"])
            self._restore_counters(state)
            return
        names = dict(self.named_params)
        if set(state["trainable"]) != set(names):
            raise ConfigError(f"{path}: the checkpoint trains other parameters than this run (another method, "
                              "targets or model)")
        with torch.no_grad():
            for n, value in state["trainable"].items():
                names[n].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self._restore_counters(state)

    def _restore_counters(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"])
        self.history = json.loads(state["history"])
        self.tokens_seen = int(state["tokens_seen"])

    # ---- the run ------------------------------------------------------------------------------------
    def run(self, until: int | None = None, on_step: Callable[[dict], None] | None = None,
            checkpoint_dir: Path | None = None) -> dict:
        """Train to step `until` (default: the last), evaluating every eval_every steps and saving a resumable
        checkpoint every save_every steps under checkpoint_dir (as step-N)."""
        c = self.config
        until = self.total_steps if until is None else min(until, self.total_steps)
        started, tokens_at_start = time.perf_counter(), self.tokens_seen
        while self.step < until:
            record = self.train_step()
            if c.eval_every and self.step % c.eval_every == 0:
                record["eval_loss"] = self.evaluate()
            elapsed = time.perf_counter() - started
            record["tokens_per_s"] = (self.tokens_seen - tokens_at_start) / max(elapsed, 1e-9)
            if checkpoint_dir is not None and c.save_every and self.step % c.save_every == 0:
                self.save(Path(checkpoint_dir) / f"step-{self.step}")
            if on_step:
                on_step(record)
        return {"step": self.step, "train": self.history["train"], "eval": self.history["eval"]}


__all__ = ["Trainer", "lr_factor", "IGNORE"]
