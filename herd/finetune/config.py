"""Every hyperparameter of a fine-tuning run, in one record (saved in checkpoints and lineage records)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from herd.errors import HerdError

METHODS = ("lora", "qlora", "full", "dpo")
DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class TrainConfig:
    method: str = "lora"
    steps: int | None = None  # optimizer steps; None: from epochs
    epochs: float | None = None  # None with steps None: one epoch
    batch_size: int = 4  # rows per micro-batch, on each process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" (after warmup) or "constant"
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    max_len: int = 512
    truncate: bool = False
    packing: bool = True
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    dpo_beta: float = 0.1
    dpo_base: str = "lora"  # what DPO trains: "lora" or "full"
    dtype: str = "float32"  # "float32" or "bfloat16" (bf16 compute, fp32 master weights)
    activation_checkpointing: bool = False
    seed: int = 0
    eval_every: int = 0  # steps between eval losses (0: at the end only, when eval data is given)
    save_every: int = 0  # steps between resumable checkpoints (0: at the end only)
    log_every: int = 1
    threads: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise HerdError(f"unknown method {self.method!r}: choose from {', '.join(METHODS)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise HerdError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.schedule not in ("cosine", "constant"):
            raise HerdError(f"schedule must be cosine or constant, got {self.schedule!r}")
        for name in ("batch_size", "grad_accum", "max_len", "lora_rank"):
            if getattr(self, name) < 1:
                raise HerdError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise HerdError(f"steps must be at least 1, got {self.steps}")
        if self.dpo_base not in ("lora", "full"):
            raise HerdError(f"dpo_base must be lora or full, got {self.dpo_base!r}")
        if isinstance(self.lora_targets, str):
            self.lora_targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        self.lora_targets = tuple(self.lora_targets)
        self.betas = tuple(self.betas)

    @property
    def uses_lora(self) -> bool:
        return self.method in ("lora", "qlora") or (self.method == "dpo" and self.dpo_base == "lora")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


__all__ = ["TrainConfig", "METHODS", "DEFAULT_TARGETS"]
