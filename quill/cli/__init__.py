"""The `quill` command: pull and list models, answer one prompt, chat interactively, serve a model,
measure a server (`bench`, in `quill.bench`), report what its traffic cost (`cost`), and quantize,
evaluate, prune and distil models. One module per group of commands; `common` holds what they share.
"""
from __future__ import annotations

import argparse
import sys

from quill import __version__
from quill.cli import generate, measure, models, optimize, serve
from quill.errors import QuillError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QuillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quill",
        description="Quill: run LLMs (GGUF files, Hugging Face directories) on the CPU with plain PyTorch.",
        epilog="Run `quill COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"quill {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (models, generate, serve, measure, optimize):  # the order `quill --help` lists them in
        group.add_commands(commands)
    return parser
