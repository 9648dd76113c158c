"""`herd serve [SOURCE]`: an OpenAI-compatible HTTP server with continuous batching."""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import socket
import sys

from herd.cli import add_model_options, load_with_progress, model_options, non_negative_int, positive_int
from herd.errors import HerdError

DEFAULT_CONTEXT = 4096
MAX_IMAGES = 16  # herd.server.app's MAX_IMAGES and MAX_REQUEST_PIXELS (the server's modules, which import torch,
MAX_REQUEST_PIXELS = 50_000_000  # load only when it runs)


def port_number(text: str) -> int:
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 0..65535 (0: any free port), got {value}")
    return value


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def add_arguments(parser, name):
    parser.add_argument("source", nargs="?", default=None,
                        help="GGUF file, model directory or alias (default smollm2-135m)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=8000,
                        help="port to listen on (default 8000; 0: any free one)")
    parser.add_argument("--api-key", default=os.environ.get("HERD_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $HERD_API_KEY, else none)")
    parser.add_argument("--max-batch", type=positive_int, default=8, help="sequences decoded together (default 8)")
    parser.add_argument("--context", type=positive_int, default=None,
                        help=f"tokens per sequence, prompt + output (default: the model's, at most {DEFAULT_CONTEXT})")
    parser.add_argument("--max-queue", type=non_negative_int, default=None,
                        help="requests that may wait to run before new ones get 429 (default 8 x max-batch)")
    parser.add_argument("--served-model-name", default=None, help="the model id clients send (default: the source)")
    parser.add_argument("--max-body-mb", type=positive_number, default=8.0,
                        help="largest request body in MiB; larger ones get 413 (default 8). Requests' input is "
                             "prepared (tokenized, rendered, its images decoded) one body's worth at a time")
    parser.add_argument("--header-timeout", type=positive_number, default=10.0,
                        help="seconds a client has to send a request's headers before the connection closes "
                             "(default 10)")
    parser.add_argument("--body-timeout", type=positive_number, default=60.0,
                        help="seconds a client has to send a request's body before it gets 408 (default 60)")
    parser.add_argument("--kv-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="KV cache dtype (default: float16 for quantized models on the CPU, whose greedy "
                             "outputs it keeps; else the model's activations: float32 on the CPU's reference path, "
                             "bfloat16 on a GPU)")
    parser.add_argument("--allow-image-urls", action="store_true",
                        help="fetch http(s) image_url parts (default: only data URLs are accepted)")
    parser.add_argument("--image-url-max-mb", type=positive_number, default=20.0,
                        help="largest image the server downloads, in MiB (default 20)")
    parser.add_argument("--image-url-timeout", type=positive_number, default=10.0,
                        help="seconds an image download may take (default 10)")
    parser.add_argument("--max-images", type=positive_int, default=MAX_IMAGES,
                        help=f"images in one request; more get 400 (default {MAX_IMAGES})")
    parser.add_argument("--max-image-pixels", type=positive_int, default=MAX_REQUEST_PIXELS,
                        help="decoded pixels (width x height) of one request's images together, read from their "
                             f"headers before any is decoded; more get 400 (default {MAX_REQUEST_PIXELS:,})")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    add_model_options(parser)


def main(args):
    import torch

    from herd.server import create_app, uvicorn_config

    # The port is bound before the model loads, so that an address in use is said at once. In a torchrun job
    # (--tp/--ep) only rank 0 serves; the others follow its forwards inside load_with_progress.
    follower = (args.tp is not None or args.ep is not None) and os.environ.get("RANK", "0") != "0"
    sock = None if follower else bind(args.host, args.port)
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
                     image_url_timeout=args.image_url_timeout, max_images=args.max_images,
                     max_image_pixels=args.max_image_pixels)
    engine = app.state.served.engine.engine
    kv = engine.kv_cache_bytes
    print(f"herd serve: {model_id} ({llm.checkpoint.format} on {llm.device}: "
          f"{compute_path(llm, engine.runner.cache.k[0].dtype)})", file=sys.stderr)
    blocks = engine.blocks
    print(f"KV cache: {args.max_batch} sequences x {context} tokens in {blocks.num_blocks - 1} blocks of "
          f"{blocks.block_size} tokens, at most {kv / 2**20:.1f} MiB, touched only as tokens arrive "
          f"(prefix caching {'on' if blocks.prefix_caching else 'off'}); queue {engine.scheduler.max_queue}",
          file=sys.stderr)
    host, port = sock.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    announce = f"listening on http://{where}:{port}/v1" + (" (API key required)" if args.api_key else "")
    return serve(uvicorn_config(app, args.host, port, log_level=args.log_level), sock, announce)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, as uvicorn binds one (SO_REUSEADDR; IPv6 for an address with a colon);
    HerdError naming the address when it cannot be."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = "the address is already in use (is another server running there? pick another --port)" \
            if e.errno == errno.EADDRINUSE else (e.strerror or str(e)).rstrip(".")
        raise HerdError(f"cannot listen on {host}:{port}: {why}") from None
    except OverflowError as e:  # a port past 65535, from a caller that skipped port_number
        sock.close()
        raise HerdError(f"cannot listen on {host}:{port}: {e}") from None
    sock.set_inheritable(True)
    return sock


def serve(config, sock: socket.socket, announce: str) -> int:
    """Run uvicorn on the bound socket; `announce` goes to stderr once it accepts connections."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                print(announce, file=sys.stderr, flush=True)

    server = Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    return 0 if server.started else 1


SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
FLOAT_FILES = {"F32", "F16", "BF16", "float32", "float16", "bfloat16"}


def compute_path(llm, kv_dtype) -> str:
    """What runs, in words: the weights as stored and as computed, whose kernels, the activations' dtype and
    the KV cache's, e.g. "Q4_1 weights, herd CPU kernels, fp32 activations, fp16 KV cache"."""
    from torch import nn

    from herd.quant.linear import BF16Linear, Int4Linear, Int8Linear, PackedLinear

    def short(dtype) -> str:
        name = str(dtype).removeprefix("torch.")
        return SHORT.get(name, name)

    found = re.search(r"\(file type (\w+)\)", llm.checkpoint.quantization)
    stored = found.group(1) if found else llm.checkpoint.quantization.split(",")[0].split(" ×")[0].strip()
    modules = list(llm.model.modules())
    activations = short(llm.model.tok_embeddings.weight.dtype)  # the residual stream's
    tail = f"{activations} activations, {short(kv_dtype)} KV cache"
    if any(isinstance(m, PackedLinear) for m in modules):
        return f"{stored} weights, herd CPU kernels, {tail}"
    if any(isinstance(m, (Int4Linear, Int8Linear, BF16Linear)) for m in modules):
        return f"{stored} weights, PyTorch's quantized matmuls on bf16 inputs, {tail}"
    dense = next((short(m.weight.dtype) for m in modules if isinstance(m, nn.Linear)), activations)
    if stored in FLOAT_FILES or short(stored) == dense:
        return f"{dense} weights, {tail}"
    return f"{stored} weights dequantized to {dense}, {tail}"
