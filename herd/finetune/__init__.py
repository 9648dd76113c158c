"""Fine-tuning: LoRA, QLoRA, full and DPO, on one process or under torchrun, exported with its lineage.

    import herd
    result = herd.finetune("smollm2-135m", data="train.jsonl", eval_data="dev.jsonl", method="lora",
                           steps=100, out="runs/tag")
    llm = herd.load("smollm2-135m", adapter="runs/tag/adapter")

herd.finetune is a client of the API: it loads the base with herd.load (dense for LoRA, full and DPO;
stored quantized for QLoRA), adds LoRA (herd.transforms.lora) or trains every weight, and runs the
loop of herd.finetune.train. It writes into `out`:
- `adapter/` (LoRA, QLoRA, DPO with LoRA): PEFT format, with a herd.json lineage record;
- `model/` (full fine-tuning, DPO full): the model as an HF directory (or GGUF when its tokenizer lives
  in a GGUF file), with its lineage;
- `checkpoints/step-N/`: resumable states (weights, optimizer, scheduler, step, RNG);
- `log.jsonl` (one line per step) and `loss.png` (train and eval loss).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from herd.errors import ConfigError, DataError, HerdError
from herd.finetune.config import DEFAULT_TARGETS, METHODS, TrainConfig


@dataclass
class FinetuneResult:
    out: Path
    adapter: Path | None
    model: Path | None
    steps: int
    train_loss: float | None
    eval_loss: float | None
    lineage: dict


def _init_distributed():
    """torchrun sets WORLD_SIZE, RANK, MASTER_ADDR ...: join its process group (gloo on CPU, NCCL on GPU)."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return None
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist


def latest_checkpoint(out: Path) -> Path | None:
    steps = sorted((int(p.name.split("-")[1]), p) for p in (out / "checkpoints").glob("step-*")
                   if (p / "trainer.pt").is_file())
    return steps[-1][1] if steps else None


def load_base(source, config: TrainConfig, device=None):
    import herd

    dtype = "bfloat16" if config.dtype == "bfloat16" and config.method != "full" else "float32"
    if config.method == "qlora":
        return herd.load(source, device="cpu", quantized="trainable", threads=config.threads)
    return herd.load(source, device=device, dtype=dtype, quantized=False, threads=config.threads)


def prepare_model(llm, config: TrainConfig) -> None:
    """LoRA wrappers (base frozen) or every weight trainable, each in a fresh copy (the loaded weights may be
    views of the file)."""
    import torch

    from herd.transforms.lora import add_lora

    model = llm.model
    if config.uses_lora:
        if config.lora_rank > llm.config.dim:  # a rank past the width adds nothing but memory (and a huge one fails)
            raise ConfigError(f"lora_rank (--lora-rank) {config.lora_rank} exceeds the model's width {llm.config.dim}")
        add_lora(model, list(config.lora_targets), config.lora_rank, config.lora_alpha, config.lora_dropout)
        return
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.float().clone()  # fp32 master weights; a tied output stays tied (one Parameter)
    model.requires_grad_(True)


def _dataset_info(ds) -> dict:
    return {"path": Path(ds.path).resolve(), "sha256": ds.sha256, "kind": ds.kind, "records": ds.records,
            "examples": len(ds.examples), "tokens": ds.tokens, "truncated": ds.truncated}


RESULTS = ("adapter", "model", "checkpoints", "log.jsonl", "loss.png")  # what a run writes into `out`


def check_out(out: Path, resume: bool | str | Path, overwrite: bool) -> Path | None:
    """Before anything loads: `out` must be a directory a run can write; a previous run's results there are
    kept unless `overwrite` (or continued with `resume`). Returns the checkpoint to resume from, if any."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a directory (--out names the directory the run writes into)")
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ConfigError(f"{out}: {above} is a file, so the directory cannot be made")
    if resume:
        where = latest_checkpoint(out) if resume is True else Path(resume)
        if where is None:
            raise ConfigError(f"{out}: no checkpoint to resume from (out/checkpoints/step-N)")
        if not (where / "trainer.pt").is_file():
            raise ConfigError(f"--resume {where}: not a fine-tuning checkpoint (a step-N directory with trainer.pt)")
        return where
    previous = [name for name in RESULTS if (out / name).exists()]
    if previous and not overwrite:
        raise ConfigError(f"{out}: holds a previous run ({', '.join(previous)}); pass --overwrite to replace it, "
                          "--resume to continue it, or choose another --out")
    return None


def finetune(source, data, out, method: str = "lora", eval_data=None, resume: bool | str | Path = False,
             progress: bool = True, device=None, stop_at: int | None = None, overwrite: bool = False,
             **options) -> FinetuneResult:
    """Fine-tune `source` (anything herd.load takes) on `data` and write the result into `out` (see the module
    doc). `options` are TrainConfig fields (steps, epochs, batch_size, grad_accum, lr, warmup_steps, max_len,
    lora_rank, lora_alpha, lora_dropout, lora_targets, dtype, activation_checkpointing, seed, eval_every,
    save_every, ...). `resume`: True continues from the latest checkpoint under out/checkpoints, a path from
    that checkpoint. `stop_at`: end after that step with a checkpoint, as an interrupted run would (the
    schedule stays that of the whole run); the adapter or model written is the one of that step. A previous
    run's results in `out` are refused unless `overwrite` (they are removed when training starts) or `resume`.
    Everything that can be checked without the model (settings, `out`, the data files) is, before it loads;
    a step whose loss or gradient is not finite stops the run (TrainingDiverged) with nothing written."""
    import torch

    from herd.finetune.data import check_fits, load_dataset, pack, read_data
    from herd.finetune.lineage import make_lineage
    from herd.finetune.train import Trainer

    config = TrainConfig(method=method, **options)
    out = Path(out)
    resume_from = check_out(out, resume, overwrite)
    train_file = read_data(data)  # read and checked before the model loads: a bad line costs no loading
    eval_file = read_data(eval_data) if eval_data else None
    for file in (train_file, eval_file):
        if file is not None and (file.kind == "preference") != (config.method == "dpo"):
            raise DataError(f"{file.path}: {file.kind} records, but --method {config.method} trains on "
                            + ("prompt/chosen/rejected records" if config.method == "dpo" else
                               "chat, prompt/completion or text records (prompt/chosen/rejected are for dpo)"))
    dist = _init_distributed()
    rank = dist.get_rank() if dist else 0
    torch.manual_seed(config.seed)
    llm = load_base(source, config, device)
    if not config.uses_lora and llm.checkpoint.tokenizer is not None and llm.checkpoint.tokenizer.kind == "gguf":
        import importlib.util

        if importlib.util.find_spec("gguf") is None:  # the model is written as GGUF: say so before training
            raise HerdError("full fine-tuning of a GGUF model writes GGUF, which needs the gguf package (a "
                            "dependency of herd this environment lacks): pip install gguf")
    device = llm.device
    tokenizer = llm.tokenizer
    chat_format = None
    try:
        chat_format = llm.chat_format
    except HerdError:
        pass  # no chat format (an unknown generation without a template): chat data is refused when read
    prepare_model(llm, config)
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0

    if config.method == "dpo":
        from herd.finetune.dpo import DPOTrainer, load_preferences

        items, cut = load_preferences(train_file, tokenizer, chat_format, config.max_len, config.truncate)
        eval_items = load_preferences(eval_file, tokenizer, chat_format, config.max_len, config.truncate)[0] \
            if eval_file else None
        train_info = {"path": train_file.path.resolve(), "sha256": train_file.sha256, "kind": "preference",
                      "records": len(items), "examples": len(items), "truncated": cut}
        eval_info = ({"path": eval_file.path.resolve(), "sha256": eval_file.sha256, "kind": "preference",
                      "records": len(eval_items)} if eval_file else None)
        trainer = DPOTrainer(llm.model, config, items, eval_items, pad_id, device, shard=not config.uses_lora)
    else:
        train_ds = load_dataset(train_file, tokenizer, chat_format, config.max_len, config.truncate)
        eval_ds = load_dataset(eval_file, tokenizer, chat_format, config.max_len, config.truncate) if eval_file else None
        rows = pack(train_ds.examples, config.max_len, config.packing)
        eval_rows = pack(eval_ds.examples, config.max_len, config.packing) if eval_ds else None
        check_fits(rows, data, llm.config.max_seq_len)
        train_info, eval_info = _dataset_info(train_ds), (_dataset_info(eval_ds) if eval_ds else None)
        trainer = Trainer(llm.model, config, rows, eval_rows, pad_id, device, shard=config.method == "full")
    if train_info.get("truncated") and rank == 0:
        print(f"herd finetune: {train_info['truncated']} example(s) cut to --max-len {config.max_len} (--truncate)")

    if resume_from is not None:
        trainer.load(resume_from)
    if rank == 0:
        if overwrite:  # the previous run goes only now, when this one is sure to start
            import shutil

            for name in RESULTS:
                target = out / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
        out.mkdir(parents=True, exist_ok=True)
    if dist:
        dist.barrier()
    log_path = out / "log.jsonl"
    log = open(log_path, "a" if resume else "w") if rank == 0 else None

    def on_step(record: dict) -> None:
        if log is not None and (record["step"] % config.log_every == 0 or "eval_loss" in record
                                or record["step"] == trainer.total_steps):
            log.write(json.dumps(record) + "\n")
            log.flush()

    if not resume and trainer.eval_items:  # the starting point of the eval curve
        first = trainer.evaluate()  # on every process: the sums are all-reduced
        if log is not None:
            log.write(json.dumps({"step": 0, "eval_loss": first}) + "\n")
    with _progress(progress and rank == 0, trainer) as report:
        def step_and_report(record):
            on_step(record)
            report(record)

        trainer.run(until=stop_at, on_step=step_and_report, checkpoint_dir=out / "checkpoints")
    if trainer.eval_items and (not trainer.history["eval"] or trainer.history["eval"][-1]["step"] != trainer.step):
        trainer.evaluate()
        on_step({"step": trainer.step, "eval_loss": trainer.history["eval"][-1]["loss"]})
    trainer.save(out / "checkpoints" / f"step-{trainer.step}")
    if log is not None:
        log.close()

    base = {"path": str(llm.checkpoint.path), "format": llm.checkpoint.format, "fingerprint": llm.base_fingerprint}
    lineage = make_lineage(base, config.method, config.to_dict(), train_info, eval_info, trainer.step)
    adapter_dir = model_dir = None
    if rank == 0:
        write_loss_curve(trainer.history, out / "loss.png")
        if config.uses_lora:
            from herd.finetune.export import adapter_fingerprint, write_adapter_dir
            from herd.transforms.lora import lora_state_dict

            lineage["fingerprint"] = adapter_fingerprint(lora_state_dict(llm.model))
            lineage["fingerprint_of"] = "adapter (A and B, float32)"
            adapter_dir = write_adapter_dir(out / "adapter", llm.model, llm.config, config.lora_rank,
                                            config.lora_alpha, config.lora_dropout, lineage, str(llm.checkpoint.path))
    if not config.uses_lora:
        from herd.finetune.export import export_model

        state = None
        if trainer.objective is not None:  # FSDP: the whole tensors, gathered on rank 0
            from herd.finetune.distributed import full_state

            state = {k.removeprefix("model."): v for k, v in full_state(trainer.objective, trainer.optimizer)[0].items()}
        if rank == 0:
            llm.model.eval()
            gguf_tokenizer = llm.checkpoint.tokenizer is not None and llm.checkpoint.tokenizer.kind == "gguf"
            model_dir = out / "model"
            target = model_dir / "model.gguf" if gguf_tokenizer else model_dir
            if gguf_tokenizer:
                model_dir.mkdir(parents=True, exist_ok=True)
            _, new_fp = export_model(llm, "gguf" if gguf_tokenizer else "hf", target, lineage, gguf_type="F32",
                                     state=state)
            lineage["fingerprint"] = new_fp
    if dist:
        dist.barrier()
        dist.destroy_process_group()
    train_losses = [r["loss"] for r in trainer.history["train"]]
    evals = [r["loss"] for r in trainer.history["eval"]]
    return FinetuneResult(out, adapter_dir, model_dir, trainer.step, train_losses[-1] if train_losses else None,
                          evals[-1] if evals else None, lineage)


class _progress:
    """A rich progress bar on stderr: step, loss, learning rate, tokens/s and the time left (a no-op when not
    wanted). The time left is herd's own estimate, the mean time of this run's steps so far times the steps to
    go: rich's estimate looks at the last 30 s only, so with steps slower than that it never shows one."""

    def __init__(self, enabled: bool, trainer, console=None, clock=None):
        import time

        self.enabled, self.trainer, self.bar, self.console = enabled, trainer, None, console
        self.clock = clock or time.monotonic

    def __enter__(self):
        if not self.enabled:
            return lambda record: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.bar = Progress(TextColumn("finetune"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TextColumn("{task.fields[left]}"), console=self.console or Console(stderr=True))
        self.bar.__enter__()
        first_step, started = self.trainer.step, self.clock()
        task = self.bar.add_task("train", total=self.trainer.total_steps, completed=first_step, info="",
                                 left="time left: after the first step")

        def report(record):
            info = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record.get('tokens_per_s', 0):,.0f} tok/s"
            if record.get("eval_loss") is not None:
                info += f"  eval {record['eval_loss']:.4f}"
            done = record["step"] - first_step
            per_step = (self.clock() - started) / max(done, 1)
            left = f"time left {_duration(per_step * (self.trainer.total_steps - record['step']))}"
            self.bar.update(task, completed=record["step"], info=info, left=left)

        return report

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def write_loss_curve(history: dict, path: Path) -> Path | None:
    """Train loss per step and eval loss where measured, as a PNG (matplotlib; skipped if it is absent)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    train = history.get("train", [])
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    evals = history.get("eval", [])
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


class _CallableModule(type(os)):
    """herd.finetune is this package and also the function: herd.finetune(source, data, out, ...)."""

    def __call__(self, *args, **kwargs):
        return finetune(*args, **kwargs)


import sys  # noqa: E402

sys.modules[__name__].__class__ = _CallableModule

__all__ = ["finetune", "check_out", "FinetuneResult", "TrainConfig", "METHODS", "DEFAULT_TARGETS", "latest_checkpoint"]
