"""`herd finetune SOURCE --data train.jsonl --method lora|qlora|full|dpo --out DIR`.

Under torchrun (`torchrun --nproc-per-node N -m herd finetune ...`) every process trains on its share of each
batch and the gradients are summed over torch.distributed (gloo on CPU, NCCL on GPU); several machines join
through torchrun's rendezvous (`--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT`)."""

from __future__ import annotations

from herd.cli import device_option, non_negative_int, positive_int, thread_count


def add_arguments(parser, name):
    from herd.finetune.config import DEFAULT_TARGETS, METHODS

    parser.add_argument("source", help="base model: GGUF file, HF or Meta directory, herd quantize output or alias")
    parser.add_argument("--data", required=True, help="training data: chat / prompt-completion / text JSONL, "
                                                      "a .txt file, or prompt/chosen/rejected JSONL for dpo")
    parser.add_argument("--eval-data", default=None, help="held-out data of the same kind: eval loss")
    parser.add_argument("--method", default="lora", choices=METHODS)
    parser.add_argument("--out", required=True, help="directory for adapter/ or model/, checkpoints, log and loss.png")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous run's results in --out (refused without it)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, default=None, help="optimizer steps")
    length.add_argument("--epochs", type=float, default=None, help="passes over the data (default 1)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="sequences per micro-batch per process")
    parser.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4 LoRA, 1e-5 full)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup-steps", type=non_negative_int, default=0)
    parser.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: none)")
    parser.add_argument("--max-len", type=positive_int, default=512, help="tokens per sequence")
    parser.add_argument("--truncate", action="store_true", help="cut longer examples (counted) instead of failing")
    parser.add_argument("--no-packing", action="store_true", help="one example per sequence")
    parser.add_argument("--lora-rank", type=positive_int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS),
                        help="projections to adapt, from q,k,v,o,gate,up,down")
    parser.add_argument("--dpo-beta", type=float, default=0.1)
    parser.add_argument("--dpo-base", choices=["lora", "full"], default="lora", help="what DPO trains")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute dtype (bfloat16 keeps fp32 master weights)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=non_negative_int, default=0, help="steps between eval losses")
    parser.add_argument("--save-every", type=non_negative_int, default=0, help="steps between resumable checkpoints")
    parser.add_argument("--resume", nargs="?", const=True, default=False,
                        help="continue from the latest checkpoint in --out (or from the checkpoint given)")
    parser.add_argument("--threads", type=thread_count, default=None)
    parser.add_argument("--device", type=device_option, default=None)


def main(args):
    import importlib.util
    import os
    import sys

    from herd.cli import install_hint, require
    from herd.finetune import finetune

    if args.method == "full" or args.method == "dpo" and args.dpo_base == "full":
        from herd.models import resolve

        path = resolve(args.source)
        if path.is_file():  # a GGUF file's fine-tuned model is written as GGUF: gguf-py, checked before loading
            require("gguf", "full fine-tuning of a GGUF model writes GGUF")
    curve = importlib.util.find_spec("matplotlib") is not None
    if not curve and int(os.environ.get("RANK", "0")) == 0:
        print(f"herd finetune: no loss.png: {install_hint('matplotlib', 'finetune')}", file=sys.stderr)
    lr = args.lr if args.lr is not None else (1e-5 if args.method == "full" or args.dpo_base == "full" and
                                              args.method == "dpo" else 2e-4)
    result = finetune(
        args.source, args.data, args.out, method=args.method, eval_data=args.eval_data, resume=args.resume,
        device=args.device, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        schedule=args.schedule, max_grad_norm=args.max_grad_norm or None, max_len=args.max_len,
        truncate=args.truncate, packing=not args.no_packing, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, lora_targets=args.lora_targets, dpo_beta=args.dpo_beta,
        dpo_base=args.dpo_base, dtype=args.dtype, activation_checkpointing=args.activation_checkpointing,
        seed=args.seed, eval_every=args.eval_every, save_every=args.save_every, threads=args.threads,
        overwrite=args.overwrite,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        made = result.adapter or result.model
        ev = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
        curve_text = f" and {result.out / 'loss.png'}" if curve else ""
        print(f"herd finetune: {result.steps} steps, train loss {result.train_loss:.4f}{ev}; wrote {made}{curve_text}")
