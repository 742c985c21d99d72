"""`lit-optim compare`: the same configuration trained once per optimizer, one process each, compared in one table.

    >>> import lit_optim
    >>> result = lit_optim.compare(["adamw_torch", "adamw_8bit"], ["trainer.max_steps=50"])   # doctest: +SKIP
    >>> print(result.table); result.path                                                      # doctest: +SKIP

- `runner`: runs the processes and writes the output directory (`compare`, `Comparison`);
- `recorder`: the callback each run gets (wall time, weight and gradient bytes, a CSV with any logger);
- `rows`: a run's numbers from its metrics (which metric each column takes, how the memory parts are computed);
- `table`: Markdown and CSV; `plots`: the PNGs (matplotlib, optional); `cli`: `lit-optim compare`.
"""

from lit_optim.comparison.runner import Comparison, compare

__all__ = ["Comparison", "compare"]
