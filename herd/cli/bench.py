"""`herd bench [SOURCE]`: herd vs llama.cpp vs HF transformers on the same file, medians and ratios."""

from __future__ import annotations


def add_arguments(parser, name):
    from herd.cli.benchmark import add_arguments as add

    add(parser)


def main(args):
    from herd.cli.benchmark import run_cli

    return run_cli(args)
