"""Training text for `quill distill`: the docstrings of Python's standard library, on any machine
with Python, plus the shipped corpus's dev split, and optionally those of installed packages.

    python benchmarks/make_docstring_corpus.py -o /tmp/distill.txt
    python benchmarks/make_docstring_corpus.py -o /tmp/distill.txt --packages numpy networkx matplotlib
    quill distill --teacher smollm2 --student STUDENT -o OUT --data /tmp/distill.txt ...

The dev split alone is 88K tokens, so a longer run repeats it and the student memorises it (its
loss drops at each epoch's start). The docstrings (about 300K SmolLM2 tokens: every module, class
and function docstring of at least 12 words, test packages and a few tool packages left out) are
English prose about Python, as the held-out split is, but different documents: the held-out split
(the Tutorial, FAQ and HOWTOs) stays unseen. `--packages` adds the docstrings of packages
installed beside this interpreter (numpy, networkx and matplotlib in Quill's test environment add
about 1M tokens), for a run long enough to repeat the rest.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from quill.optimize.evaluate import corpus_path  # noqa: E402

_LEFT_OUT = ("site-packages", "idlelib", "lib2to3", "turtledemo", "pydoc_data", "encodings")


def docstrings(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if "test" in relative or relative.startswith(_LEFT_OUT):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= 12:
                    found.append(inspect.cleandoc(doc))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, required=True, help="the text file to write")
    parser.add_argument("--packages", nargs="*", default=[], metavar="NAME",
                        help="installed packages whose docstrings are added too")
    parser.add_argument("--dev-repeats", type=int, default=1, metavar="N",
                        help="copies of the dev split at the start (default: %(default)s): more of the text "
                        "that is most like what the student will be scored on")
    args = parser.parse_args()
    if args.dev_repeats < 1:
        parser.error(f"--dev-repeats must be at least 1, got {args.dev_repeats}")
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = docstrings(root)
    for name in args.packages:
        package = Path(sysconfig.get_paths()["purelib"]) / name
        if not package.is_dir():
            parser.error(f"{name} is not installed in {package.parent}")
        texts += docstrings(package)
    dev = corpus_path("dev").read_text(encoding="utf-8")
    args.output.write_text("\n\n".join([dev] * args.dev_repeats + texts), encoding="utf-8")
    print(f"wrote {args.output}: the dev split{f' {args.dev_repeats} times' if args.dev_repeats > 1 else ''} "
          f"and {len(texts)} docstrings from {root}"
          + (f" and {', '.join(args.packages)}" if args.packages else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
