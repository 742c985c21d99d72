"""The README's optimizer table and test command stay true to the code."""

from __future__ import annotations

import re
from pathlib import Path

from lit_optim import docs

ROOT = Path(__file__).resolve().parent.parent


def test_readme_optimizer_table_matches_registry():
    text = (ROOT / "README.md").read_text()
    assert docs.render_readme(text) == text, "README table is stale: run `python -m lit_optim.docs`"


def test_readme_table_lists_every_name():
    import lit_optim

    text = (ROOT / "README.md").read_text()
    for name in lit_optim.list_optimizers():
        assert f"| `{name}`" in text


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- ci:test -->\s*```bash\n(.+?)\n```\s*<!-- /ci:test -->", readme, re.S)
    assert block and "pytest" in block.group(1)
    assert "ci:test" in (ROOT / ".ci" / "run").read_text()
