"""The comparison's PNG plots (matplotlib, the `plots` extra): loss against step and against wall time, where the
memory goes per optimizer (stacked bar; the parts are described in `lit_optim.comparison.rows`), tokens/s.

Without matplotlib `write_plots` writes nothing and says how to get the plots; the tables do not need it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lit_optim.comparison.rows import GIB, HOST, MANAGED, Row

NO_MATPLOTLIB = ("plots: skipped, matplotlib is not installed (pip install matplotlib, or pip install -e '.[plots]' "
                 "in the clone)")
FILES = ("loss_vs_step.png", "loss_vs_time.png", "memory.png", "tokens_per_sec.png")
# Inside the peak first (bottom up), then what lies outside the device allocator, hatched.
PARTS = ["weights", "gradients", "optimizer state", "rest", MANAGED, HOST]
OUTSIDE = {MANAGED, HOST}


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_plots(rows: list[Row], out: str | Path) -> list[Path]:
    """The PNGs in `out` (paths written); [] without matplotlib."""
    if not have_matplotlib():
        return []
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (headless GPU nodes)
    import matplotlib.pyplot as plt

    out = Path(out)
    written = []
    for name, draw in zip(FILES, (_loss_vs_step, _loss_vs_time, _memory, _tokens_per_sec)):
        fig, ax = plt.subplots(figsize=(8, 4.8), layout="constrained")
        try:
            draw(ax, rows)
            fig.savefig(out / name, dpi=110)
            written.append(out / name)
        finally:
            plt.close(fig)
    return written


def _label(row: Row) -> str:
    return row.optimizer if row.ok else f"{row.optimizer} (failed)"


def _loss_vs_step(ax, rows: list[Row]) -> None:
    for row in rows:
        points = [(s, v) for s, v in row.metrics.series.get("train/loss", []) if s is not None]
        if points:
            ax.plot(*zip(*points), label=_label(row))
    ax.set(xlabel="optimizer step", ylabel="train loss", title="Train loss by step")
    _legend(ax)


def _loss_vs_time(ax, rows: list[Row]) -> None:
    for row in rows:
        # train/loss and time/since_launch_s are logged at the same steps (ComparisonRecorder): pair them by step.
        when = {s: t for s, t in row.metrics.series.get("time/since_launch_s", [])}
        points = [(when[s], v) for s, v in row.metrics.series.get("train/loss", []) if s in when]
        if points:
            ax.plot(*zip(*points), label=_label(row))
    ax.set(xlabel="seconds since launch", ylabel="train loss", title="Train loss by wall time (start-up included)")
    _legend(ax)


def _memory(ax, rows: list[Row]) -> None:
    shown = [r for r in rows if r.memory_parts]
    names = [r.optimizer for r in shown]
    bottoms = [0.0] * len(shown)
    for part in PARTS:
        heights = [r.memory_parts.get(part, 0.0) / GIB for r in shown]
        if not any(heights):
            continue
        ax.bar(names, heights, bottom=bottoms, label=part, hatch="//" if part in OUTSIDE else None)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    if bottoms:  # room above the tallest stack for the legend (autoscaling leaves the stacks' tops on the frame)
        ax.set_ylim(0, max(bottoms) * 1.25)
    on_host = any(r.memory_total_on != "device" for r in shown)
    ax.set(ylabel="GiB", title="Where the memory goes" + (" (CPU run: the host process's peak)" if on_host else
                                                          " (peak allocated + managed/host state, hatched)"))
    ax.tick_params(axis="x", labelrotation=20)
    _legend(ax)


def _tokens_per_sec(ax, rows: list[Row]) -> None:
    shown = [r for r in rows if r.tokens_per_s is not None]
    bars = ax.bar([r.optimizer for r in shown], [r.tokens_per_s for r in shown])
    ax.bar_label(bars, fmt="{:,.0f}")
    ax.set(ylabel="tokens/s", title="Throughput (last logging interval)")
    ax.tick_params(axis="x", labelrotation=20)


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
