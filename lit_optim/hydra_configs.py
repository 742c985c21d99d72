"""Renders `conf/optim/<name>.yaml` from the registry, so the Hydra group and the registry cannot drift apart.

    python -m lit_optim.hydra_configs          # rewrite conf/optim/ from the registry
    python -m lit_optim.hydra_configs --check  # exit 1 if any file differs (tests run the same check)
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import yaml

from lit_optim.build import accepted_arguments
from lit_optim.builders.offload import offload_problem
from lit_optim.registry import all_specs
from lit_optim.spec import OptimizerSpec

# Constructor switches that are implementation details, not tuning knobs; still settable with `+optim.<key>=...`.
_HIDDEN = {"foreach", "maximize", "capturable", "differentiable", "fused", "args", "triton", "gradient_release",
           "decoupled_weight_decay", "param_info", "optim_bits", "is_paged"}
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _yaml_value(value):
    if isinstance(value, tuple):
        return [_yaml_value(v) for v in value]
    return value


def render(spec: OptimizerSpec, name: str | None = None) -> str:
    """The YAML for `spec`, selectable as `optim=<name>` (the spec's name or one of its aliases)."""
    name = name or spec.name
    args = accepted_arguments(spec)
    values = {"name": name}
    for key, default in args.items():
        if key in _HIDDEN or key in spec.fixed:
            continue
        value = spec.defaults.get(key, default)
        if value is inspect.Parameter.empty:
            value = 1e-3 if key == "lr" else None
        values[key] = _yaml_value(value)
    for key, value in spec.defaults.items():
        values.setdefault(key, _yaml_value(value))
    if offload_problem(spec) is None:  # listed so `optim.offload=cpu` needs no `+`
        values["offload"] = None
        values["offload_gradients"] = False
    bpp = spec.bytes_per_param()
    state = f"{bpp:.3g} bytes/param of optimizer state" + (
        f" ({spec.bits}-bit{', paged' if spec.paged else ''})" if spec.bits else "") + " vs 8 for fp32 AdamW"
    where = "CUDA only" if spec.requires_cuda or "cpu" not in spec.supports else "CPU or CUDA"
    header = [
        f"# {name}: {spec.description}" if name == spec.name else f"# {name}: alias of {spec.name}. {spec.description}",
        f"# {state}; {where}; backend: {spec.backend}.",
        f"#   lit-optim train optim={name}" + (f" optim.lr={values['lr']}" if "lr" in values else ""),
        "# Generated from the registry by `python -m lit_optim.hydra_configs`; edit the spec, not this file.",
    ]
    others = [n for n in spec.names if n != name]
    if others:
        header.insert(2, f"# Same optimizer as: {', '.join(others)}.")
    body = yaml.safe_dump(values, sort_keys=False, default_flow_style=None)
    return "\n".join(header) + "\n" + body


def expected_files() -> dict[str, str]:
    """One file per registry name and alias, so Hugging Face spellings work on the command line too."""
    return {f"{name}.yaml": render(spec, name) for spec in all_specs() for name in spec.names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report differences instead of writing")
    args = parser.parse_args(argv)
    optim_dir = CONF_DIR / "optim"
    want = expected_files()
    have = {p.name: p.read_text() for p in optim_dir.glob("*.yaml")}
    stale = sorted(set(have) - set(want))
    differ = sorted(n for n in want if have.get(n) != want[n])
    if args.check:
        for n in stale:
            print(f"conf/optim/{n}: no registry name")
        for n in differ:
            print(f"conf/optim/{n}: differs from the registry")
        return 1 if stale or differ else 0
    optim_dir.mkdir(parents=True, exist_ok=True)
    for n in stale:
        (optim_dir / n).unlink()
    for n, text in want.items():
        (optim_dir / n).write_text(text)
    print(f"wrote {len(want)} files to conf/optim/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
