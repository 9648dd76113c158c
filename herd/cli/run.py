"""`herd run [SOURCE] PROMPT`: one completion, streamed to stdout."""

from __future__ import annotations

import sys

from herd.cli import (add_model_options, add_sampling_options, given_sampling, load_with_progress, model_options,
                      sampling_settings)


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
    from herd.images import load_image

    given = given_sampling(args)  # every check that needs no model comes before loading it
    source, prompt = (None, args.words[0]) if len(args.words) == 1 else (args.words[0], " ".join(args.words[1:]))
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt:
        raise HerdError("the prompt is empty: give the text to answer or complete ('-' reads it from stdin)")
    if args.raw and args.image:
        raise HerdError("--image needs the chat format (drop --raw)")
    for path in args.image:
        load_image(path)  # read and decoded now: a bad picture is named before the model loads
    llm = load_with_progress(source, args.device, args.dtype, **model_options(args))
    settings, described = sampling_settings(llm, given)
    options = dict(settings, max_tokens=512 if args.max_tokens is None else args.max_tokens)
    if args.verbose:
        print(f"sampling: {described}; up to {options['max_tokens']} tokens", file=sys.stderr)
    started = time.perf_counter()
    if args.raw:
        steps = llm.stream(prompt, **options)
    else:
        content = [{"type": "image_url", "image_url": {"url": p}} for p in args.image] + [{"type": "text", "text": prompt}]
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": content if args.image else prompt}
        ]
        steps = llm.chat_stream(messages, **options)
    count = 0
    for step in steps:
        count += 1
        sys.stdout.write(step.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose:
        seconds = time.perf_counter() - started
        print(f"{count} tokens in {seconds:.2f} s ({count / seconds:.1f} tokens/s)", file=sys.stderr)
