"""Rebuild Quill's evaluation corpus (quill/data/eval/) from the Python 3.11 documentation sources.

The prose comes from the reStructuredText sources that Debian's `python3.11-doc` package installs
(`/usr/share/doc/python3.11/html/_sources`). Only top-level paragraphs of running text are kept:
code, directives, literal blocks, tables and titles are dropped, and inline markup is reduced to
its text. Whole documents go to one split or the other, so no page straddles the two.

    apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb doc
    python benchmarks/make_eval_corpus.py doc/usr/share/doc/python3.11/html/_sources
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

# The prose-rich parts of the documentation (the library reference is mostly API signatures).
DOCUMENTS = ["tutorial/*.rst.txt", "faq/*.rst.txt", "howto/*.rst.txt"]
HELDOUT_EVERY = 3  # every third document (in sorted order) is held out
OUT = Path(__file__).resolve().parent.parent / "quill" / "data" / "eval"

_ROLE = re.compile(r":[\w:.-]+:`~?!?([^`<]*?)\s*(?:<[^`>]*>)?`")  # :func:`text <target>` -> text
_LINK = re.compile(r"`([^`<]+?)\s*(?:<[^`>]*>)?`__?")  # `text <url>`_ -> text
_LITERAL = re.compile(r"``(.+?)``")
_EMPHASIS = re.compile(r"\*\*?([^*\s][^*]*?)\*\*?")
_NOISE = re.compile(r"\[#\w*\]_|\|\w+\||\\ ")  # footnote references, substitutions, escaped spaces


def prose_paragraphs(rst: str) -> list[str]:
    """Unindented paragraphs of running text, markup reduced to plain words, one line each."""
    paragraphs, current = [], []
    for line in rst.splitlines() + [""]:
        if line.strip() and not line[0].isspace():
            current.append(line.strip())
            continue
        if current:  # a blank or indented line ends the paragraph
            paragraphs.append(" ".join(current))
            current = []
    return [clean for clean in map(_clean, paragraphs) if _is_prose(clean)]


def _clean(paragraph: str) -> str:
    text = _ROLE.sub(r"\1", paragraph)
    text = _LINK.sub(r"\1", text)
    text = _LITERAL.sub(r"\1", text)
    text = _EMPHASIS.sub(r"\1", text)
    text = _NOISE.sub("", text)
    text = re.sub(r"\s*::$", ":", text)  # "as follows::" introduces a dropped literal block
    return re.sub(r"\s+", " ", text).strip()


def _is_prose(text: str) -> bool:
    """Sentences, not titles, directives, tables, list bullets or code."""
    words = text.split()
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return (len(words) >= 12 and text[-1] in ".:?!)\"'" and not text.startswith(("..", "+", "=", "-", "*", ">>>"))
            and letters / len(text) > 0.85)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", type=Path, help="the html/_sources directory of python3.11-doc")
    args = parser.parse_args()
    files = sorted({path for pattern in DOCUMENTS for path in args.sources.glob(pattern)})
    splits: dict[str, list[str]] = {"dev": [], "heldout": []}
    for index, path in enumerate(files):
        paragraphs = prose_paragraphs(path.read_text(encoding="utf-8"))
        if paragraphs:
            splits["heldout" if index % HELDOUT_EVERY == HELDOUT_EVERY - 1 else "dev"].append("\n\n".join(paragraphs))
    OUT.mkdir(parents=True, exist_ok=True)
    for name, documents in splits.items():
        text = "\n\n".join(documents) + "\n"
        (OUT / f"{name}.txt").write_text(text, encoding="utf-8")
        print(f"{name}.txt: {len(documents)} documents, {len(text.encode()) // 1024} KiB")


if __name__ == "__main__":
    main()
