"""`herd chat [SOURCE]`: an interactive, multi-turn, streaming chat.

/reset forgets the conversation, /exit (or Ctrl-D) leaves. Ctrl-C while the model is answering
stops that answer and keeps what was said so far; Ctrl-C at the prompt leaves.
"""

from __future__ import annotations

import sys

from herd.cli import add_model_options, add_sampling_options, load_with_progress, model_options, sampling_kwargs

HELP = "Type a message. /reset starts over, /exit leaves (Ctrl-D too); Ctrl-C stops an answer."


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
    llm = load_with_progress(args.source, args.device, args.dtype, **model_options(args))
    options = dict(sampling_kwargs(args), max_tokens=1024 if args.max_tokens is None else args.max_tokens)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print(f"herd chat: {llm.checkpoint.path.name}. {HELP}")
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
            messages = list(system)
            print("(conversation cleared)")
            continue
        if text in ("/help", "/?"):
            print(HELP)
            continue
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
