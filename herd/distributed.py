"""torch.distributed for inference across processes: the process group of a torchrun job, and the leader /
follower protocol that lets one process (rank 0) drive a tensor-parallel model.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init` joins that group with gloo
on the CPU and NCCL on a GPU, never a transport of herd's own. Every collective has a timeout
(HERD_DIST_TIMEOUT seconds, default 120), so a rank that hangs ends the job instead of stalling it; a rank
that dies closes its sockets and the others' next collective fails at once. Either way the surviving ranks
print one clear line and exit with EXIT_RANK_LOST: a process group that lost a member cannot be repaired.

Leader and followers (herd.transforms.tensor_parallel.ParallelTransformer uses this): rank 0 runs
everything a single process runs (HTTP server, scheduler, sampling, image encoding); before each forward it
broadcasts a StepDescription (the tokens, where their keys go, and any image features they take), and the
other ranks, looping in `follow`, run the same forward on their shard of the weights and their own KV cache.
A forward's all-reduces line the ranks up; rank 0 gets the logits. While rank 0 has nothing to run it
broadcasts a heartbeat every third of the timeout, so an idle server is not mistaken for a dead one.
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass

import torch

from herd.errors import HerdError

DEFAULT_TIMEOUT_S = 120.0
EXIT_RANK_LOST = 3


class DistributedError(HerdError):
    """A rank of the job failed, or the job is not set up for the parallel layout asked for."""


def timeout_s() -> float:
    text = os.environ.get("HERD_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(text)
    except ValueError:
        raise DistributedError(f"HERD_DIST_TIMEOUT={text!r} is not a number of seconds") from None
    if not value > 0:
        raise DistributedError(f"HERD_DIST_TIMEOUT must be positive, got {value}")
    return value


def in_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def init(device: torch.device) -> torch.device:
    """Join the torchrun job's process group (once); returns this rank's device (cuda:LOCAL_RANK on GPUs)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if not in_torchrun():
            raise DistributedError("tensor or expert parallelism runs inside a torchrun job: "
                                   "torchrun --nproc-per-node N -m herd run|chat|serve|eval SOURCE --tp N")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s()),
                                device_id=device if device.type == "cuda" else None)
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def fatal(message: str) -> None:
    """The job cannot go on: say why on stderr and end this process now (other threads included)."""
    print(f"herd (rank {rank()} of {world_size()}): {message}; ending the job", file=sys.stderr, flush=True)
    os._exit(EXIT_RANK_LOST)


@dataclass
class StepDescription:
    """What one forward computes, in the terms every rank can rebuild a Batch from. kind: "forward",
    "heartbeat" or "stop". The cache is named by rank 0's id for it and its geometry; `live_caches` lets
    followers free the caches rank 0 has dropped."""

    kind: str
    tokens: torch.Tensor | None = None
    last_only: bool = False
    positions: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    max_len: int = 0
    start: int | None = None
    last: torch.Tensor | None = None
    cache: tuple | None = None  # (id, num_blocks, block_size, dtype name)
    live_caches: tuple = ()
    image_embeds: tuple | None = None  # Llama 4: (mask [B, T], feature rows), encoded on rank 0


def _broadcast(desc: StepDescription | None) -> StepDescription:
    import torch.distributed as dist

    box = [desc]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Leader:
    """Rank 0's side: `run(model_forward, tokens, batch, last_only)` broadcasts the step, then runs it.
    One lock orders steps and heartbeats, so the collectives of two threads never interleave."""

    def __init__(self):
        self.lock = threading.Lock()
        self.caches: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.last_sent = time.monotonic()
        self.stopped = False
        self._heartbeat = threading.Thread(target=self._beat, name="herd-heartbeat", daemon=True)
        self._heartbeat.start()
        atexit.register(self.stop)

    def send(self, desc: StepDescription) -> None:
        try:
            _broadcast(desc)
        except Exception as e:  # gloo/NCCL: a peer closed its connection or the timeout passed
            fatal(f"another rank stopped answering ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        self.last_sent = time.monotonic()

    def run(self, forward, tokens, batch, last_only: bool, image_embeds=None):
        with self.lock:
            if self.stopped:
                raise DistributedError("the followers were released (Leader.stop); no more forwards")
            self.send(self.describe(tokens, batch, last_only, image_embeds))
            try:
                return forward(tokens, batch, last_only, image_embeds)
            except RuntimeError as e:
                if "gloo" in str(e).lower() or "nccl" in str(e).lower() or "connection" in str(e).lower():
                    fatal(f"a collective failed during the forward ({str(e).splitlines()[0][:200]})")
                raise

    def describe(self, tokens, batch, last_only: bool, image_embeds=None) -> StepDescription:
        cache = None
        if batch is not None and batch.cache is not None:
            c = batch.cache
            self.caches[id(c)] = c
            cache = (id(c), c.num_blocks, c.block_size, str(c.k[0].dtype).removeprefix("torch."))
        cpu = (lambda t: None if t is None else t.cpu())
        return StepDescription(
            "forward", tokens.cpu(), last_only,
            None if batch is None else cpu(batch.positions), None if batch is None else cpu(batch.block_tables),
            0 if batch is None else batch.max_len, None if batch is None else batch.start,
            None if batch is None else cpu(batch.last), cache, tuple(self.caches.keys()),
            None if image_embeds is None else tuple(cpu(t) for t in image_embeds))

    def _beat(self) -> None:
        interval = timeout_s() / 3
        while not self.stopped:
            time.sleep(min(interval, 1.0))
            if time.monotonic() - self.last_sent < interval:
                continue
            with self.lock:
                if not self.stopped and time.monotonic() - self.last_sent >= interval:
                    self.send(StepDescription("heartbeat"))

    def stop(self) -> None:
        """Release the followers (their `follow` returns). Called at exit; safe to call twice."""
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
            try:
                _broadcast(StepDescription("stop"))
            except Exception:  # a follower already gone: nothing left to release
                pass


def shutdown(model=None) -> None:
    """End this process's part in the job: release the followers (rank 0) and leave the process group, so
    that gloo's threads are joined before the interpreter exits (left to the exit, they abort it)."""
    import torch.distributed as dist

    leader = getattr(model, "leader", None)
    if leader is not None:
        leader.stop()
    if dist.is_initialized():
        dist.destroy_process_group()


def follow(model, device: torch.device) -> None:
    """A follower rank's loop: run each forward rank 0 describes, on this rank's shard, until it says stop."""
    from herd.model.cache import Batch, PagedKVCache

    caches: dict[int, PagedKVCache] = {}
    args = model.args
    with torch.inference_mode():
        while True:
            try:
                desc = _broadcast(None)
            except Exception as e:
                fatal(f"rank 0 stopped answering ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            if desc.kind == "stop":
                return
            if desc.kind != "forward":
                continue
            for key in set(caches) - set(desc.live_caches):
                del caches[key]
            cache = None
            if desc.cache is not None:
                key, num_blocks, block_size, dtype = desc.cache
                if key not in caches:
                    caches[key] = PagedKVCache(args.n_layers, args.n_kv_heads, args.head_dim, num_blocks, block_size,
                                               getattr(torch, dtype), device)
                cache = caches[key]
            batch = None
            if desc.positions is not None:
                to = (lambda t: None if t is None else t.to(device))
                batch = Batch(to(desc.positions), cache, to(desc.block_tables), desc.max_len, desc.start, to(desc.last))
            images = None if desc.image_embeds is None else tuple(t.to(device) for t in desc.image_embeds)
            try:
                model.local_forward(desc.tokens.to(device), batch, desc.last_only, images)
            except RuntimeError as e:
                fatal(f"a collective failed during the forward ({str(e).splitlines()[0][:200]})")


__all__ = ["init", "follow", "shutdown", "fatal", "Leader", "StepDescription", "DistributedError", "in_torchrun", "rank",
           "world_size", "timeout_s", "EXIT_RANK_LOST"]
