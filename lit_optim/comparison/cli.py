"""`lit-optim compare optim=a,b,c [train overrides] [--out DIR] [--budget-gib N] [--timeout S]`."""

from __future__ import annotations

import argparse
import sys

USAGE = """lit-optim compare optim=NAME,NAME,... [lit-optim train overrides] [--out DIR] [--budget-gib N] [--timeout S]

Trains the same configuration once per optimizer, one process each, and writes a comparison table (Markdown, CSV)
and plots into one directory. Examples:

    lit-optim compare optim=adamw_torch,adamw_8bit,adafactor trainer.max_steps=50
    lit-optim compare recipe=llama31_8b optim=adamw_torch,paged_adamw_32bit,adamw_8bit,paged_adamw_8bit
"""


def parse(argv: list[str]) -> tuple[list[str], list[str], argparse.Namespace]:
    """(optimizers, the other overrides, options). Options start with --; everything else is a train override."""
    parser = argparse.ArgumentParser(prog="lit-optim compare", usage=USAGE, add_help=True)
    parser.add_argument("--out", help="output directory (default: compare/<date>_<time>)")
    parser.add_argument("--budget-gib", type=float, help="device-memory budget for the fits column (GiB)")
    parser.add_argument("--timeout", type=float, help="seconds a run may take before it is stopped (default: none)")
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("--")]
    if unknown:
        parser.error(f"unknown option {unknown[0]} (options: --out, --budget-gib, --timeout)")
    optims = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "optim"]
    if len(optims) != 1:
        parser.error("name the optimizers once, e.g. optim=adamw_torch,adamw_8bit (`lit-optim list` shows them)")
    rest = [o for o in overrides if o.split("=", 1)[0] != "optim"]
    return [n for n in optims[0].split(",") if n], rest, args


def main(argv: list[str]) -> int:
    from lit_optim.comparison.runner import compare
    from lit_optim.errors import LitOptimError

    optims, overrides, args = parse(argv)
    try:
        comparison = compare(optims, overrides, out=args.out, budget_gib=args.budget_gib, timeout_s=args.timeout)
    except LitOptimError as err:
        print(f"lit-optim: {err}", file=sys.stderr)
        return 2
    # The comparison itself succeeded even when runs failed (they are rows); no run at all finishing is an error.
    return 0 if any(r.ok for r in comparison.rows) else 1
