"""The comparison table: Markdown (read by people, printed at the end) and CSV (full precision, read by programs)."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable

from lit_optim.comparison.rows import Row

REASON_CELL = 100  # characters of a failure reason in a Markdown cell; the whole line is listed under the table


def _f(spec: str) -> Callable[[float | None], str]:
    return lambda v: "-" if v is None else spec.format(v)


# (Markdown header, CSV header, Row attribute, Markdown format)
COLUMNS: list[tuple[str, str, str, Callable[[float | None], str]]] = [
    ("final loss", "final_train_loss", "final_loss", _f("{:.4g}")),
    ("min loss", "min_train_loss", "min_loss", _f("{:.4g}")),
    ("val loss", "final_val_loss", "val_loss", _f("{:.4g}")),
    ("tokens/s", "tokens_per_s", "tokens_per_s", _f("{:,.0f}")),
    ("opt step ms", "optimizer_step_ms", "opt_step_ms", _f("{:.2f}")),
    ("opt step share", "optimizer_step_share", "opt_step_share", _f("{:.1%}")),
    ("first step s", "first_step_s", "first_step_s", _f("{:.3g}")),
    ("launch to step 1 s", "launch_to_step1_s", "launch_to_step1_s", _f("{:.1f}")),
    ("peak device GiB", "peak_device_gib", "peak_device_gib", _f("{:.2f}")),
    ("managed GiB", "managed_gib", "managed_gib", _f("{:.2f}")),
    ("host GiB", "host_gib", "host_gib", _f("{:.2f}")),
    ("state B/param", "state_bytes_per_param", "state_bytes_per_param", _f("{:.3g}")),
]


def _budget(rows: list[Row]) -> float | None:
    return next((r.budget_gib for r in rows if r.budget_gib is not None), None)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def result_cell(row: Row) -> str:
    if row.ok:
        return "ok"
    reason = (row.reason or "").removeprefix("lit-optim: ")
    short = reason if len(reason) <= REASON_CELL else reason[:REASON_CELL - 1] + "…"
    return f"failed (exit {row.exit_code}): {short}"


def markdown(rows: list[Row]) -> str:
    budget = _budget(rows)
    heads = ["optimizer", "result", *(c[0] for c in COLUMNS)] + ([f"fits {budget:g} GiB"] if budget is not None else [])
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    for row in rows:
        cells = [f"`{row.optimizer}`", result_cell(row), *(fmt(getattr(row, attr)) for _, _, attr, fmt in COLUMNS)]
        if budget is not None:
            cells.append(row.fits or "-")
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    failed = [f"- `{r.optimizer}` (exit {r.exit_code}): {r.reason}" for r in rows if not r.ok]
    return "\n".join(lines + ([""] + failed if failed else []))


def csv_text(rows: list[Row]) -> str:
    budget = _budget(rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    heads = ["optimizer", "exit_code", "reason", "seconds", *(c[1] for c in COLUMNS)]
    if budget is not None:
        heads += ["budget_gib", "fits_budget"]
    writer.writerow(heads)
    for row in rows:
        cells = [row.optimizer, row.exit_code, row.reason or "", "" if row.seconds is None else f"{row.seconds:.1f}"]
        cells += ["" if getattr(row, attr) is None else repr(getattr(row, attr)) for _, _, attr, _ in COLUMNS]
        if budget is not None:
            cells += [f"{budget:g}", row.fits]
        writer.writerow(cells)
    return out.getvalue()
