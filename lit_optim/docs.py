"""Keeps the README's optimizer table and DDP/FSDP1/FSDP2 support matrix equal to the code.

    python -m lit_optim.docs           # rewrite the tables between the optimizer-table and support-matrix markers
    python -m lit_optim.docs --check   # exit 1 if it is stale (a test runs this check)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lit_optim.cli import optimizer_table
from lit_optim.support_matrix import matrix_table

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- optimizer-table -->", "<!-- /optimizer-table -->"
MATRIX_START, MATRIX_END = "<!-- support-matrix -->", "<!-- /support-matrix -->"


def _replace(text: str, start: str, end: str, body: str) -> str:
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def render_readme(text: str) -> str:
    """README.md with the optimizer table and the DDP/FSDP1/FSDP2 support matrix regenerated from the code."""
    text = _replace(text, START, END, optimizer_table(markdown=True))
    return _replace(text, MATRIX_START, MATRIX_END, matrix_table())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    text = README.read_text()
    new = render_readme(text)
    if args.check:
        if new != text:
            print("README.md optimizer table or support matrix is stale: run `python -m lit_optim.docs`")
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
