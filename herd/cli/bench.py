"""`herd bench [SOURCE]`: herd vs llama.cpp vs HF transformers on the same file, medians and ratios."""

from __future__ import annotations


def add_arguments(parser, name):
    from herd.bench import add_arguments as add

    add(parser)


def main(args):
    from herd.bench import run_cli

    return run_cli(args)
