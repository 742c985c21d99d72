"""Keeps the README's optimizer table equal to the registry.

    python -m lit_optim.docs           # rewrite the table between the optimizer-table markers in README.md
    python -m lit_optim.docs --check   # exit 1 if it is stale (a test runs this check)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lit_optim.cli import optimizer_table

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- optimizer-table -->", "<!-- /optimizer-table -->"


def render_readme(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{optimizer_table(markdown=True)}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    text = README.read_text()
    new = render_readme(text)
    if args.check:
        if new != text:
            print("README.md optimizer table is stale: run `python -m lit_optim.docs`")
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
