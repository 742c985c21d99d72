"""A `lit-optim train` process read back from its files: the metrics its CSV logger wrote, and why it failed.

Shared by `lit-optim compare` and `benchmarks/big_models.py`, which both run one training process per configuration
(so memory peaks do not mix) and read the monitors' numbers back afterwards.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunMetrics:
    """Every numeric value a CSV logger wrote, per metric as ``(step, value)`` in the order logged."""

    series: dict[str, list[tuple[int | None, float]]] = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def read(cls, path: str | Path) -> RunMetrics:
        """One ``metrics.csv`` (Lightning's `CSVLogger`); an absent file gives no metrics."""
        path = Path(path)
        series: dict[str, list[tuple[int | None, float]]] = {}
        if not path.is_file():
            return cls(series, None)
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                step = _number(row.get("step"))
                for key, text in row.items():
                    if key in ("step", "epoch") or text in (None, ""):
                        continue
                    value = _number(text)
                    if value is not None:
                        series.setdefault(key, []).append((None if step is None else int(step), value))
        return cls(series, path)

    @classmethod
    def find(cls, run_dir: str | Path) -> RunMetrics:
        """The metrics of a run directory: its CSV logger's folder is the logger's name (recipes name theirs), so
        whichever ``*/version_*/metrics.csv`` is there, the newest version."""
        found = sorted(Path(run_dir).glob("*/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
        return cls.read(found[-1]) if found else cls({}, None)

    def values(self, key: str) -> list[float]:
        return [v for _, v in self.series.get(key, [])]

    def last(self, key: str) -> float | None:
        values = self.values(key)
        return values[-1] if values else None

    def max(self, key: str) -> float | None:
        values = self.values(key)
        return max(values) if values else None

    def min(self, key: str) -> float | None:
        values = self.values(key)
        return min(values) if values else None


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def failure_reason(output: str, returncode: int) -> str | None:
    """Why a `lit-optim train` process failed, in one line; None if it did not.

    lit_optim reports a refused run (bad input, out of memory) as one line starting ``lit-optim:`` -- its last such
    line, since a finished run's summary lines start so too. Otherwise the last line naming an error (a traceback's
    last line), else the exit status.
    """
    if returncode == 0:
        return None
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if line.startswith("lit-optim:")), None)
    if reason is not None:
        return reason
    reason = next((line for line in reversed(lines) if "Error" in line or "error:" in line), None)
    if reason is not None:
        return reason
    if returncode < 0:
        return f"killed by signal {-returncode}" + (" (out of host memory?)" if returncode == -9 else "")
    return f"exit status {returncode}"
