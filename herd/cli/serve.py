"""`herd serve [SOURCE]`: an OpenAI-compatible HTTP server with continuous batching."""

from __future__ import annotations

import os
import sys

from herd.cli import add_model_options, load_with_progress, model_options, non_negative_int, positive_int

DEFAULT_CONTEXT = 4096


def add_arguments(parser, name):
    parser.add_argument("source", nargs="?", default=None,
                        help="GGUF file, model directory or alias (default smollm2-135m)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=non_negative_int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("HERD_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $HERD_API_KEY, else none)")
    parser.add_argument("--max-batch", type=positive_int, default=8, help="sequences decoded together (default 8)")
    parser.add_argument("--context", type=positive_int, default=None,
                        help=f"tokens per sequence, prompt + output (default: the model's, at most {DEFAULT_CONTEXT})")
    parser.add_argument("--max-queue", type=non_negative_int, default=None,
                        help="requests that may wait to run before new ones get 429 (default 8 x max-batch)")
    parser.add_argument("--served-model-name", default=None, help="the model id clients send (default: the source)")
    parser.add_argument("--max-body-mb", type=float, default=8.0,
                        help="largest request body in MiB; larger ones get 413 (default 8)")
    parser.add_argument("--header-timeout", type=float, default=10.0,
                        help="seconds a client has to send a request's headers before the connection closes "
                             "(default 10)")
    parser.add_argument("--body-timeout", type=float, default=60.0,
                        help="seconds a client has to send a request's body before it gets 408 (default 60)")
    parser.add_argument("--kv-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="KV cache dtype (default: float16 for quantized models on the CPU, whose greedy "
                             "outputs it keeps; else the model's activations: float32 on the CPU's reference path, "
                             "bfloat16 on a GPU)")
    parser.add_argument("--allow-image-urls", action="store_true",
                        help="fetch http(s) image_url parts (default: only data URLs are accepted)")
    parser.add_argument("--image-url-max-mb", type=float, default=20.0,
                        help="largest image the server downloads, in MiB (default 20)")
    parser.add_argument("--image-url-timeout", type=float, default=10.0,
                        help="seconds an image download may take (default 10)")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    add_model_options(parser)


def main(args):
    import torch
    import uvicorn

    from herd.server import create_app, uvicorn_config

    llm = load_with_progress(args.source, args.device, args.dtype, **model_options(args))
    context = args.context or min(llm.config.max_seq_len, DEFAULT_CONTEXT)
    if context > llm.config.max_seq_len:
        print(f"herd serve: --context {context} exceeds the model's context of {llm.config.max_seq_len}",
              file=sys.stderr)
        return 2
    source = args.source or "smollm2-135m"
    model_id = args.served_model_name or (llm.checkpoint.path.stem if os.path.exists(source) else source)
    aliases = {source, str(llm.checkpoint.path), llm.checkpoint.path.name, llm.checkpoint.path.stem}
    app = create_app(llm, max_batch=args.max_batch, context=context, max_queue=args.max_queue,
                     api_key=args.api_key, model_id=model_id, aliases=aliases,
                     max_body_bytes=int(args.max_body_mb * 2**20), header_timeout=args.header_timeout,
                     body_timeout=args.body_timeout, kv_dtype=getattr(torch, args.kv_dtype) if args.kv_dtype else None,
                     allow_image_urls=args.allow_image_urls, image_url_max_bytes=int(args.image_url_max_mb * 2**20),
                     image_url_timeout=args.image_url_timeout)
    engine = app.state.served.engine.engine
    kv = engine.kv_cache_bytes
    print(f"herd serve: {model_id} ({llm.checkpoint.format}, {llm.device}, {llm.model.tok_embeddings.weight.dtype})",
          file=sys.stderr)
    blocks = engine.blocks
    print(f"KV cache: {args.max_batch} sequences x {context} tokens in {blocks.num_blocks - 1} blocks of "
          f"{blocks.block_size} tokens, at most {kv / 2**20:.1f} MiB, touched only as tokens arrive "
          f"(prefix caching {'on' if blocks.prefix_caching else 'off'}); queue {engine.scheduler.max_queue}",
          file=sys.stderr)
    print(f"listening on http://{args.host}:{args.port}/v1" + (" (API key required)" if args.api_key else ""),
          file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn_config(app, args.host, args.port, log_level=args.log_level))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0 if server.started else 1
