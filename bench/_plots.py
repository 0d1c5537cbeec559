"""Plot helpers shared by the benchmarks: one look for every PNG under bench/results/.

matplotlib is optional (`pip install -e '.[bench]'`): it is imported only when a plot is made,
with the Agg backend (no display needed), and every function that writes a file returns False
when it is missing, so that the benchmarks still run and write their JSON without it.

Two kinds of panel:

- `distribution`: latency distributions, several labelled series of samples on a log latency
  axis, as a complementary CDF (share of samples slower than x, log scale: the tail is
  visible) or as a CDF (share of samples at most x, linear scale);
- `curves`: x/y series (values over time, and the like), drawn as lines or steps.

`figure()` makes a figure of one or more panels and `save()` writes it; `distribution_plot()`
and `curve_plot()` do both for a figure of one panel.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PANEL_SIZE = (8.0, 5.0)  # inches, per panel
DPI = 110
LEGEND_SIZE = 8
Series = Mapping[str, Sequence[float]]
XY = Mapping[str, tuple[Sequence[float], Sequence[float]]]
Styles = Mapping[str, Mapping[str, Any]]


def pyplot() -> Any | None:
    """`matplotlib.pyplot` on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def figure(
    rows: int = 1, cols: int = 1, *, title: str | None = None, size: tuple[float, float] | None = None
) -> tuple[Any, list[Any]] | None:
    """(figure, flat list of axes) for a grid of panels, or None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    if size is None:
        size = (PANEL_SIZE[0] * min(cols, 2) * (0.75 if cols > 1 else 1.0), PANEL_SIZE[1] * rows * 0.9)
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    if title:
        suptitle(fig, title)
    return fig, [ax for row in axes for ax in row]


def wrap(text: str, inches: float, fontsize: float) -> str:
    """`text` broken into lines that fit `inches` at `fontsize` points (about half an em a character)."""
    chars = max(20, int(inches * 72 / (fontsize * 0.5)))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def suptitle(fig: Any, title: str) -> None:
    """A figure title (wrapped to the figure's width by `save`)."""
    fig.suptitle(title, fontsize=11)


def _wrap_titles(fig: Any) -> None:
    """Wrap the figure's and the panels' titles to the widths the layout gave them."""
    title = fig.get_suptitle()
    if title:
        fig.suptitle(wrap(title, fig.get_figwidth() * 0.95, 11), fontsize=11)
    for ax in fig.axes:
        title = ax.get_title()
        if title:
            ax.set_title(wrap(title, ax.get_position().width * fig.get_figwidth(), 10), fontsize=10)


def save(fig: Any, path: Path) -> bool:
    """Lay out, write `path` (PNG) and close the figure."""
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    _wrap_titles(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    if plt is not None:
        plt.close(fig)
    return True


def _decade_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks between lo and hi (both > 0)."""
    ticks = []
    for exp in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            t = m * 10.0**exp
            if lo <= t <= hi:
                ticks.append(t)
    return ticks


def log_axis(ax: Any, values: Sequence[float], axis: str = "x") -> None:
    """A log axis over `values` (the positive ones), with plain-number ticks at 1, 2, 5 x 10^k."""
    import matplotlib.ticker as ticker

    positive = [v for v in values if v > 0]
    if not positive:
        return
    lo, hi = min(positive) / 1.15, max(positive) * 1.15
    if axis == "x":
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        target = ax.xaxis
    else:
        ax.set_yscale("log")
        ax.set_ylim(lo, hi)
        target = ax.yaxis
    ticks = _decade_ticks(lo, hi)
    if len(ticks) >= 2:
        target.set_major_locator(ticker.FixedLocator(ticks))
    target.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_formatter(ticker.NullFormatter())


def _finish(ax: Any, title: str | None, xlabel: str | None, ylabel: str | None, legend: bool) -> None:
    if title:
        ax.set_title(title, fontsize=10)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=LEGEND_SIZE)


def distribution(
    ax: Any,
    series: Series,
    *,
    unit: str = "ms",
    kind: str = "ccdf",
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    styles: Styles | None = None,
    log_x: bool = True,
    legend: bool = True,
) -> None:
    """One curve per series of samples (values in `unit`).

    kind "ccdf": share of samples slower than x, log y (the tail gets the room); kind "cdf":
    share at most x, linear y from 0 to 1. The series' sample counts go in the legend.
    """
    if kind not in ("ccdf", "cdf"):
        raise ValueError(f"kind must be 'ccdf' or 'cdf', not {kind!r}")
    styles = styles or {}
    largest = 1
    values: list[float] = []
    for label, samples in series.items():
        data = sorted(samples)
        n = len(data)
        if not n:
            continue
        largest = max(largest, n)
        values += [data[0], data[-1]]
        ys = [1 - i / n for i in range(n)] if kind == "ccdf" else [(i + 1) / n for i in range(n)]
        ax.step(data, ys, where="post", label=f"{label} (n={n:,})", **styles.get(label, {}))
    if log_x:
        log_axis(ax, values, "x")
    if kind == "ccdf":
        ax.set_yscale("log")
        ax.set_ylim(0.6 / largest, 1.05)
    else:
        ax.set_ylim(0, 1.02)
    _finish(
        ax,
        title,
        xlabel or f"latency, {unit}" + (" (log)" if log_x else ""),
        ylabel or ("share of requests slower (log)" if kind == "ccdf" else "share of requests at most x"),
        legend,
    )


def curves(
    ax: Any,
    series: XY,
    *,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    styles: Styles | None = None,
    step: bool = False,
    log_x: bool = False,
    log_y: bool = False,
    legend: bool = True,
) -> None:
    """One line per (xs, ys) series; `step` draws steps (each value held until the next x)."""
    styles = styles or {}
    xs_all: list[float] = []
    ys_all: list[float] = []
    for label, (xs, ys) in series.items():
        if not len(xs):
            continue
        xs_all += list(xs)
        ys_all += list(ys)
        if step:
            ax.step(xs, ys, where="post", label=label, **styles.get(label, {}))
        else:
            ax.plot(xs, ys, label=label, **styles.get(label, {}))
    if log_x:
        log_axis(ax, xs_all, "x")
    if log_y:
        log_axis(ax, ys_all, "y")
    _finish(ax, title, xlabel, ylabel, legend)


def distribution_plot(path: Path, series: Series, *, title: str, **kwargs: Any) -> bool:
    """A one-panel figure of `distribution(...)` written to `path`; False without matplotlib."""
    made = figure(title=None)
    if made is None:
        return False
    fig, (ax,) = made
    distribution(ax, series, title=title, **kwargs)
    return save(fig, path)


def curve_plot(path: Path, series: XY, *, title: str, **kwargs: Any) -> bool:
    """A one-panel figure of `curves(...)` written to `path`; False without matplotlib."""
    made = figure(title=None)
    if made is None:
        return False
    fig, (ax,) = made
    curves(ax, series, title=title, **kwargs)
    return save(fig, path)
