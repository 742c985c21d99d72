"""The package's import graph is one-way: names and policy above, builders in the middle, plain optimizers below.

Read from the source (every import, including those inside functions), so a cycle cannot hide behind a lazy import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lit_optim"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                # `from pkg import sub` depends on the submodule; `from pkg import name` on the package.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                # Every module imports its parent packages first anyway: that is not a dependency to check.
                if target and target != mod and not mod.startswith(target + "."):
                    graph[mod].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# What each layer may not import: the layer above it and everything on top.
TOP = {"lit_optim.build", "lit_optim.registry", "lit_optim.mixin", "lit_optim.train", "lit_optim.cli",
       "lit_optim.description", "lit_optim.hf_args", "lit_optim.task", "lit_optim.callbacks"}
FORBIDDEN = {
    "lit_optim.optimizers": TOP | {"lit_optim.specs", "lit_optim.builders"},
    "lit_optim.builders": TOP | {"lit_optim.specs"},
    "lit_optim.specs": TOP,
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer):
    graph = _graph()
    bad = sorted(
        f"{mod} imports {dep}"
        for mod, deps in graph.items() if mod == layer or mod.startswith(layer + ".")
        for dep in deps if any(dep == f or dep.startswith(f + ".") for f in FORBIDDEN[layer])
    )
    assert bad == []


def test_plain_optimizers_build_without_the_registry():
    """GaLore around a class, in-backward around a factory: no registry name anywhere."""
    import torch

    from lit_optim.optimizers.galore import GaLore
    from lit_optim.optimizers.in_backward import InBackwardOptimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    galore = GaLore(model.parameters(), lr=1e-2, rank=4, inner=torch.optim.Adam, inner_kwargs={"betas": (0.8, 0.9)})
    model(torch.randn(8, 16)).square().mean().backward()
    before = model[0].weight.detach().clone()
    galore.step()
    assert not torch.equal(before, model[0].weight)
    assert galore.state[model[0].weight]["exp_avg"].shape == galore.projected_shape(model[0].weight)
    assert galore.settings_for(model[0].weight)["betas"] == (0.8, 0.9)

    stepped = InBackwardOptimizer(model.parameters(), lambda group: torch.optim.SGD([group], lr=0.1))
    with stepped.stepping():
        model(torch.randn(8, 16)).square().mean().backward()
    assert all(p.grad is None for p in model.parameters())  # each stepped and freed in backward
