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

from herd.errors import HerdError
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
        add_lora(model, list(config.lora_targets), config.lora_rank, config.lora_alpha, config.lora_dropout)
        return
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.float().clone()  # fp32 master weights; a tied output stays tied (one Parameter)
    model.requires_grad_(True)


def _dataset_info(ds) -> dict:
    return {"path": Path(ds.path).resolve(), "sha256": ds.sha256, "kind": ds.kind, "records": ds.records,
            "examples": len(ds.examples), "tokens": ds.tokens, "truncated": ds.truncated}


def finetune(source, data, out, method: str = "lora", eval_data=None, resume: bool | str | Path = False,
             progress: bool = True, device=None, stop_at: int | None = None, **options) -> FinetuneResult:
    """Fine-tune `source` (anything herd.load takes) on `data` and write the result into `out` (see the module
    doc). `options` are TrainConfig fields (steps, epochs, batch_size, grad_accum, lr, warmup_steps, max_len,
    lora_rank, lora_alpha, lora_dropout, lora_targets, dtype, activation_checkpointing, seed, eval_every,
    save_every, ...). `resume`: True continues from the latest checkpoint under out/checkpoints, a path from
    that checkpoint. `stop_at`: end after that step with a checkpoint, as an interrupted run would (the
    schedule stays that of the whole run); the adapter or model written is the one of that step."""
    import torch

    from herd.finetune.data import check_fits, file_sha256, load_dataset, pack
    from herd.finetune.lineage import make_lineage
    from herd.finetune.train import Trainer

    config = TrainConfig(method=method, **options)
    dist = _init_distributed()
    rank = dist.get_rank() if dist else 0
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    llm = load_base(source, config, device)
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

        items, cut = load_preferences(data, tokenizer, chat_format, config.max_len, config.truncate)
        eval_items = load_preferences(eval_data, tokenizer, chat_format, config.max_len, config.truncate)[0] \
            if eval_data else None
        train_info = {"path": Path(data).resolve(), "sha256": file_sha256(Path(data)), "kind": "preference",
                      "records": len(items), "examples": len(items), "truncated": cut}
        eval_info = ({"path": Path(eval_data).resolve(), "sha256": file_sha256(Path(eval_data)), "kind": "preference",
                      "records": len(eval_items)} if eval_data else None)
        trainer = DPOTrainer(llm.model, config, items, eval_items, pad_id, device, shard=not config.uses_lora)
    else:
        train_ds = load_dataset(data, tokenizer, chat_format, config.max_len, config.truncate)
        eval_ds = load_dataset(eval_data, tokenizer, chat_format, config.max_len, config.truncate) if eval_data else None
        rows = pack(train_ds.examples, config.max_len, config.packing)
        eval_rows = pack(eval_ds.examples, config.max_len, config.packing) if eval_ds else None
        check_fits(rows, data, llm.config.max_seq_len)
        train_info, eval_info = _dataset_info(train_ds), (_dataset_info(eval_ds) if eval_ds else None)
        trainer = Trainer(llm.model, config, rows, eval_rows, pad_id, device, shard=config.method == "full")
    if train_info.get("truncated") and rank == 0:
        print(f"herd finetune: {train_info['truncated']} example(s) cut to --max-len {config.max_len} (--truncate)")

    if resume:
        where = latest_checkpoint(out) if resume is True else Path(resume)
        if where is None:
            raise HerdError(f"{out}: no checkpoint to resume from (out/checkpoints/step-N)")
        trainer.load(where)
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
    """A rich progress bar on stderr: step, loss, learning rate, tokens/s (a no-op when not wanted)."""

    def __init__(self, enabled: bool, trainer):
        self.enabled, self.trainer, self.bar = enabled, trainer, None

    def __enter__(self):
        if not self.enabled:
            return lambda record: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("finetune"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeRemainingColumn(), console=Console(stderr=True))
        self.bar.__enter__()
        task = self.bar.add_task("train", total=self.trainer.total_steps, completed=self.trainer.step, info="")

        def report(record):
            info = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record.get('tokens_per_s', 0):,.0f} tok/s"
            if record.get("eval_loss") is not None:
                info += f"  eval {record['eval_loss']:.4f}"
            self.bar.update(task, completed=record["step"], info=info)

        return report

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


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

__all__ = ["finetune", "FinetuneResult", "TrainConfig", "METHODS", "DEFAULT_TARGETS", "latest_checkpoint"]
