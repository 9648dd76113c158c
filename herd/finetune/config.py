"""Every hyperparameter of a fine-tuning run, in one record (saved in checkpoints and lineage records)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import math

from herd.errors import ConfigError

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
            raise ConfigError(f"unknown method {self.method!r}: choose from {', '.join(METHODS)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"schedule must be cosine or constant, got {self.schedule!r}")
        if self.dpo_base not in ("lora", "full"):
            raise ConfigError(f"dpo_base must be lora or full, got {self.dpo_base!r}")
        for name in ("batch_size", "grad_accum", "max_len", "lora_rank", "log_every"):
            _whole(self, name, least=1)
        for name in ("warmup_steps", "eval_every", "save_every"):
            _whole(self, name, least=0)
        for name in ("steps", "threads"):
            if getattr(self, name) is not None:
                _whole(self, name, least=1)
        _whole(self, "seed", least=0, most=2**64 - 1)  # what torch.manual_seed takes
        # every float finite: a nan or inf hyperparameter trains to NaN weights without a word
        _number(self, "lr", above=0)
        _number(self, "lora_alpha", above=0)
        _number(self, "dpo_beta", above=0)
        _number(self, "adam_eps", above=0)
        _number(self, "weight_decay", least=0)
        _number(self, "lora_dropout", least=0, below=1)
        if self.epochs is not None:
            _number(self, "epochs", above=0)  # 0 epochs is no training, not one step
        if self.max_grad_norm is not None:
            _number(self, "max_grad_norm", least=0)
        try:
            b1, b2 = self.betas
        except (TypeError, ValueError):
            raise ConfigError(f"betas must be two numbers, got {self.betas!r}") from None
        self.betas = (b1, b2)
        for i, b in enumerate(self.betas):
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1:
                raise ConfigError(f"betas[{i}] must be a number in [0, 1), got {b!r}")
        from herd.transforms.lora import parse_targets  # (torch: not imported for `herd --help`)

        try:
            self.lora_targets = tuple(parse_targets(self.lora_targets))
        except ValueError as e:
            raise ConfigError(f"lora_targets (--lora-targets): {e}") from None

    @property
    def uses_lora(self) -> bool:
        return self.method in ("lora", "qlora") or (self.method == "dpo" and self.dpo_base == "lora")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _flag(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


def _whole(config, name: str, least: int, most: int | None = None) -> None:
    v = getattr(config, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < least or (most is not None and v > most):
        bound = f"from {least} to {most}" if most is not None else f"at least {least}"
        raise ConfigError(f"{_flag(name)} must be a whole number {bound}, got {v!r}")


def _number(config, name: str, least: float | None = None, above: float | None = None,
            below: float | None = None) -> None:
    v = getattr(config, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{_flag(name)} must be a finite number, got {v!r}")
    if least is not None and v < least:
        raise ConfigError(f"{_flag(name)} must be >= {least:g}, got {v!r}")
    if above is not None and v <= above:
        raise ConfigError(f"{_flag(name)} must be > {above:g}, got {v!r}")
    if below is not None and v >= below:
        raise ConfigError(f"{_flag(name)} must be < {below:g}, got {v!r}")


__all__ = ["TrainConfig", "METHODS", "DEFAULT_TARGETS"]
