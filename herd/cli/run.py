"""`herd run [SOURCE] PROMPT`: one completion, streamed to stdout."""

from __future__ import annotations

import sys

from herd.cli import add_model_options, add_sampling_options, load_with_progress, model_options, sampling_kwargs


def add_arguments(parser, name):
    parser.add_argument("words", nargs="+", metavar="[SOURCE] PROMPT",
                        help="model (GGUF file, directory or alias; default smollm2-135m) then the prompt ('-' reads stdin)")
    parser.add_argument("--system", default=None, help="system prompt (chat models)")
    parser.add_argument("--raw", action="store_true", help="plain text completion, no chat format")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="a picture before the prompt (repeatable; models that see images)")
    parser.add_argument("--verbose", action="store_true", help="print token counts and speed to stderr")
    add_sampling_options(parser)
    add_model_options(parser)


def main(args):
    import time

    from herd.errors import HerdError

    source, prompt = (None, args.words[0]) if len(args.words) == 1 else (args.words[0], " ".join(args.words[1:]))
    if prompt == "-":
        prompt = sys.stdin.read()
    llm = load_with_progress(source, args.device, args.dtype, **model_options(args))
    options = dict(sampling_kwargs(args), max_tokens=512 if args.max_tokens is None else args.max_tokens)
    started = time.perf_counter()
    if args.raw and args.image:
        print("herd run: --image needs the chat format (drop --raw)", file=sys.stderr)
        return 2
    if args.raw:
        steps = llm.stream(prompt, **options)
    else:
        content = [{"type": "image_url", "image_url": {"url": p}} for p in args.image] + [{"type": "text", "text": prompt}]
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": content if args.image else prompt}
        ]
        try:
            steps = llm.chat_stream(messages, **options)
        except HerdError as e:
            print(f"herd run: {e}", file=sys.stderr)
            return 2
    count = 0
    for step in steps:
        count += 1
        sys.stdout.write(step.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose:
        seconds = time.perf_counter() - started
        print(f"{count} tokens in {seconds:.2f} s ({count / seconds:.1f} tokens/s)", file=sys.stderr)
