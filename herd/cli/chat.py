"""`herd chat [SOURCE]`: an interactive, multi-turn, streaming chat.

/image PATH attaches a picture to the next message (models that see images), /reset forgets the
conversation, /exit (or Ctrl-D) leaves. Ctrl-C while the model is answering
stops that answer and keeps what was said so far; Ctrl-C at the prompt leaves.
"""

from __future__ import annotations

import sys

from herd.cli import (add_model_options, add_sampling_options, given_sampling, load_with_progress, model_options,
                      sampling_settings)

REPLY_TOKENS = 256  # a reply a person reads at the terminal (about 200 words); --max-tokens for more
HELP = ("Type a message. /image PATH attaches a picture to the next one, /reset starts over, /exit leaves "
        "(Ctrl-D too); Ctrl-C stops an answer.")


def add_arguments(parser, name):
    parser.add_argument("source", nargs="?", default=None, help="GGUF file, model directory or alias")
    parser.add_argument("--system", default=None, help="system prompt")
    add_sampling_options(parser)
    add_model_options(parser)


def main(args):
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    given = given_sampling(args)  # checked before the model loads
    llm = load_with_progress(args.source, args.device, args.dtype, **model_options(args))
    settings, described = sampling_settings(llm, given)
    options = dict(settings, max_tokens=REPLY_TOKENS if args.max_tokens is None else args.max_tokens)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    images: list[str] = []  # /image paths waiting for the next message
    print(f"herd chat: {llm.checkpoint.path.name}; sampling {described}; replies up to {options['max_tokens']} "
          f"tokens (--max-tokens). {HELP}")
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return 0
        if text == "/reset":
            messages, images = list(system), []
            print("(conversation cleared)")
            continue
        if text in ("/help", "/?"):
            print(HELP)
            continue
        if text.startswith("/image"):
            path = text.removeprefix("/image").strip()
            error = image_problem(llm, path)
            if error:
                print(f"error: {error}", file=sys.stderr)
            else:
                images.append(path)
                print(f"(image {path} attached to your next message)")
            continue
        if images:
            parts = [{"type": "image_url", "image_url": {"url": p}} for p in images]
            messages.append({"role": "user", "content": parts + [{"type": "text", "text": line}]})
            images = []
        else:
            messages.append({"role": "user", "content": line})
        reply = []
        try:
            for step in llm.chat_stream(messages, **options):
                reply.append(step.text)
                sys.stdout.write(step.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except Exception as e:  # a failed turn (context full, ...) must not end the chat
            messages.pop()
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def image_problem(llm, path: str) -> str | None:
    """Why `path` cannot be attached (no path, a model that cannot see, an unreadable image), or None."""
    from herd.errors import ImageError
    from herd.images import load_image

    if not path:
        return "give the picture's path: /image PATH"
    if not llm.sees_images:
        return f"{llm.checkpoint.path.name} cannot see images"
    try:
        load_image(path)
    except ImageError as e:
        return str(e)
    return None
