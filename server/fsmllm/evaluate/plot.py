"""The certified curves as a figure (curves.png)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fsmllm.evaluate.compute import CurvePoint, curve_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def curve_figure(points: Sequence[CurvePoint], title: str) -> Figure:
    """Mean certified FCSB against ε with the 10-90 % band: one panel per (n, σ), a colour per setting (booster
    or not), solid for the whole feature and dashed for the worst token (the "... (token)" settings)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    token = curve_name("", "token")
    sigmas, ns = sorted({p.sigma for p in points}), sorted({p.n for p in points})
    colours = {
        base: f"C{i % 10}" for i, base in enumerate(dict.fromkeys(p.setting.removesuffix(token) for p in points))
    }
    figure, grid = plt.subplots(
        len(ns),
        len(sigmas),
        figsize=(1 + 4 * len(sigmas), 1.2 + 2.8 * len(ns)),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    for (row, n), (column, sigma) in itertools.product(enumerate(ns), enumerate(sigmas)):
        axes = grid[row][column]
        panel = [p for p in points if (p.n, p.sigma) == (n, sigma)]
        for setting in dict.fromkeys(p.setting for p in panel):
            line = sorted((p for p in panel if p.setting == setting), key=lambda p: p.radius)
            radii, colour = [p.radius for p in line], colours[setting.removesuffix(token)]
            style = "--" if setting.endswith(token) else "-"
            axes.plot(
                radii, [p.mean for p in line], marker="o", markersize=4, color=colour, linestyle=style, label=setting
            )
            axes.fill_between(radii, [p.q10 for p in line], [p.q90 for p in line], alpha=0.12, color=colour)
        axes.set_title(f"σ = {sigma:g}, n = {n}" + ("" if panel else " (not run)"), fontsize=10)
        axes.set_ylim(0, 1)
        axes.grid(alpha=0.3)
    for axes in grid[-1]:
        axes.set_xlabel("l2 radius ε (pixels in [0, 1])")
    for row in grid:
        row[0].set_ylabel("certified FCSB (abstain = 0)")
    handles = [Line2D([], [], color=colour, marker="o", label=base) for base, colour in colours.items()]
    if any(p.setting.endswith(token) for p in points):
        handles += [
            Line2D([], [], color="grey", label="whole feature"),
            Line2D([], [], color="grey", linestyle="--", label="worst token"),
        ]
    columns = min(len(handles), 4)
    figure.legend(handles=handles, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=11)
    legend_rows = math.ceil(len(handles) / columns)
    figure.tight_layout(rect=(0, (0.1 + 0.22 * legend_rows) / figure.get_figheight(), 1, 1))
    return figure


def plot_curves(points: Sequence[CurvePoint], path: str, title: str) -> None:
    """Write :func:`curve_figure` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    figure = curve_figure(points, title)
    figure.savefig(path, dpi=110)
    plt.close(figure)
