"""`lit-optim`: the command line.

    lit-optim train [hydra overrides...]   train (see conf/train.yaml), e.g. optim=paged_adamw_8bit optim.lr=2e-5
    lit-optim list [PATTERN] [--markdown]  the registry as a table, with availability on this machine
    lit-optim describe NAME                one optimizer in detail
    lit-optim compare optim=a,b,c [...]    train once per optimizer, compare them (table, plots)
    lit-optim estimate [overrides] [optim=a,b] [--budget-gib N]   each optimizer's peak memory, before training
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from lit_optim.noise import quiet_import_noise


def optimizer_table(pattern: str | None = None, markdown: bool = False) -> str:
    from lit_optim.registry import availability, get_spec, list_optimizers
    from lit_optim.spec import CPU

    headers = ["name", "backend", "builds", "state B/param", "runs on", "available here"]
    rows = []
    for name in list_optimizers(pattern):
        spec = get_spec(name)
        gpu_only = spec.requires_cuda or CPU not in spec.supports
        runs = "CUDA" + (f" >= {'.'.join(map(str, spec.min_compute_capability))}" if spec.min_compute_capability
                         else "") if gpu_only else "CPU, CUDA"
        kind = (f"{spec.bits}-bit" if spec.bits else "stateless") + (", paged" if spec.paged else "")
        avail = availability(spec)
        rows.append([
            name + (f" ({', '.join(spec.aliases)})" if spec.aliases else ""),
            spec.backend,
            spec.target.split(":")[-1],
            f"{spec.bytes_per_param():.3g} ({kind})",
            runs,
            "yes" if avail.ok else f"no: {avail.reason}",
        ])
    if markdown:
        head = headers[:5]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for name, row in zip(list_optimizers(pattern), rows):
            aliases = get_spec(name).aliases
            cell = f"`{name}`" + (f" (also {', '.join(f'`{a}`' for a in aliases)})" if aliases else "")
            lines.append("| " + " | ".join([cell, *row[1:5]]) + " |")
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_import_noise()
    if argv and argv[0] == "estimate":
        from lit_optim.errors import LitOptimError
        from lit_optim.memory_estimate import main as estimate_main

        try:
            return estimate_main(argv[1:])
        except LitOptimError as err:
            print(f"lit-optim: {err}", file=sys.stderr)
            return 2
    if argv and argv[0] == "train":
        from lit_optim import train

        # Lightning's DDP launcher starts every other rank by re-running `__main__` (as a file, or as a module when
        # it has a spec, i.e. `python -m lit_optim.cli`) with sys.argv[1:]: point both at the training script.
        sys.argv = [train.__file__, *argv[1:]]
        main_module = sys.modules.get("__main__")
        if getattr(main_module, "__spec__", None) is not None:
            main_module.__spec__ = importlib.util.find_spec("lit_optim.train")
        train.main()
        return 0
    if argv and argv[0] == "compare":
        from lit_optim.comparison.cli import main as compare_main

        return compare_main(argv[1:])
    parser = argparse.ArgumentParser(prog="lit-optim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train with Hydra overrides (see `lit-optim train --help`)")
    p_list = sub.add_parser("list", help="list optimizers")
    p_list.add_argument("pattern", nargs="?", help="shell-style filter, e.g. '*8bit*'")
    p_list.add_argument("--markdown", action="store_true", help="a Markdown table (as in the README)")
    sub.add_parser("compare", help="train once per optimizer and compare (see `lit-optim compare --help`)")
    p_desc = sub.add_parser("describe", help="describe one optimizer")
    p_desc.add_argument("name")
    sub.add_parser("estimate", help="peak memory per optimizer before training (see `lit-optim estimate --help`)")
    args = parser.parse_args(argv)
    from lit_optim.errors import LitOptimError

    try:
        if args.command == "list":
            print(optimizer_table(args.pattern, args.markdown))
        elif args.command == "describe":
            from lit_optim.description import describe

            print(describe(args.name))
    except LitOptimError as err:
        print(f"lit-optim: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
