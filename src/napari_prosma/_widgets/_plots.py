"""The widgets' figures: the gate inspector's bars and the fine-tuning curves.

The drawing takes a matplotlib ``Figure`` and plain values, so it is tested with Agg
without a window; matplotlib is imported when a widget is made, not when napari starts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..inference.gates import GateStage, slice_channel_gate

SCAN_COLOUR, SLICE_COLOUR, C_COLOUR, LAM_COLOUR, ZERO_COLOUR = (
    "#4c9be8",
    "#f2a541",
    "#58c48b",
    "#c678dd",
    "#f2a541",
)


def plot_canvas(figsize: tuple[float, float], min_height: int) -> tuple[Any, Any]:
    """``(figure, canvas)``: a matplotlib figure in a Qt canvas that grows with the dock."""
    from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
    from matplotlib.figure import Figure
    from qtpy.QtWidgets import QSizePolicy

    figure = Figure(figsize=figsize, dpi=90)
    canvas = FigureCanvasQTAgg(figure)
    canvas.setMinimumHeight(min_height)
    canvas.setMinimumWidth(220)
    canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
    return figure, canvas


def theme_colours(viewer: Any) -> tuple[str, str]:
    """``(text, background)`` colours of the viewer's theme (black on white if unknown)."""
    try:
        from napari.utils.theme import get_theme

        theme = get_theme(viewer.theme)
        return theme.text.as_hex(), theme.background.as_hex()
    except Exception:  # any theme trouble: plain black on white
        return "#000000", "#ffffff"


def style(ax: Any, fg: str, bg: str) -> None:
    """Colour an axes for the theme (small ticks, text in ``fg`` on ``bg``)."""
    ax.set_facecolor(bg)
    ax.tick_params(labelsize=6, colors=fg)
    ax.title.set_color(fg)
    ax.yaxis.label.set_color(fg)
    ax.xaxis.label.set_color(fg)
    for side in ax.spines.values():
        side.set_color(fg)


# ---------------------------------------------------------------------------- gates


def draw_gates(
    fig: Any,
    gates: Sequence[GateStage],
    *,
    mode: str,
    slice_index: int | None,
    slice_values: Sequence[float | None],
    ranges: Mapping[int, tuple[float, float]],
    colours: tuple[str, str],
) -> bool:
    """Draw the sparsity of every stage (scan, slice, training range), then per stage the
    channel gate c and the thresholds λ with each latent channel's exact-zero fraction.

    Args:
        fig: a matplotlib figure (cleared first).
        gates: the result's stages, finest first.
        mode: the plan's mode (``"image"``, ``"slices"``, ``"slice"``).
        slice_index: the slice the slice values refer to (volumes), or None.
        slice_values: exact-zero fraction of each stage on that slice (None: unknown).
        ranges: the card's sparsity range per stage.
        colours: ``(text, background)``.

    Returns:
        True when c was drawn per slice (else it is the whole result's).
    """
    fig.clear()
    if not gates:
        return False
    fg, bg = colours
    fig.set_facecolor(bg)
    n = len(gates)
    grid = fig.add_gridspec(
        n + 1,
        2,
        height_ratios=[1.5] + [1.0] * n,
        hspace=0.95,
        wspace=0.55,
        left=0.13,
        right=0.87,
        top=0.9,
        bottom=0.05,
    )
    _sparsity_bars(
        fig.add_subplot(grid[0, :]), gates, mode, slice_index, slice_values, ranges, fg, bg
    )
    per_slice_any = False
    for row, g in enumerate(gates, start=1):
        axc = fig.add_subplot(grid[row, 0])
        c, per_slice = slice_channel_gate(g, slice_index)
        per_slice_any = per_slice_any or per_slice
        if c is not None:
            axc.bar(np.arange(len(c)), c, color=C_COLOUR, width=0.9)
            axc.set_ylim(0, 1)
            where = (
                f"slice {slice_index}" if per_slice else ("slice" if mode == "slice" else "scan")
            )
            axc.set_title(f"stage {g.stage}: c per channel ({where})", fontsize=8)
        else:
            _empty(axc, "no channel gate", fg)
        axl = fig.add_subplot(grid[row, 1])
        if g.lam is not None:
            _lambda_bars(axl, g, fg, label=row == 1)
        else:
            _empty(axl, "no sparse gate", fg)
        for a in (axc, axl):
            style(a, fg, bg)
    return per_slice_any


def _sparsity_bars(
    ax: Any,
    gates: Sequence[GateStage],
    mode: str,
    slice_index: int | None,
    slice_values: Sequence[float | None],
    ranges: Mapping[int, tuple[float, float]],
    fg: str,
    bg: str,
) -> None:
    n = len(gates)
    x = np.arange(n)
    scan = [np.nan if g.zero_frac_mean is None else g.zero_frac_mean * 100 for g in gates]
    has_slice = any(v is not None for v in slice_values) and mode != "slice"
    width = 0.38 if has_slice else 0.6
    ax.bar(x - (width / 2 if has_slice else 0), scan, width, color=SCAN_COLOUR, label="scan")
    if has_slice:
        ax.bar(
            x + width / 2,
            [np.nan if v is None else v * 100 for v in slice_values],
            width,
            color=SLICE_COLOUR,
            label=f"slice {slice_index}",
        )
    ranged = [(i, ranges[g.stage]) for i, g in enumerate(gates) if g.stage in ranges]
    if ranged:  # an I-beam per stage: the training images' span, over its bars
        xs = np.array([i for i, _ in ranged], dtype=float)
        lo = np.array([r[0] for _, r in ranged]) * 100
        hi = np.array([r[1] for _, r in ranged]) * 100
        ax.errorbar(
            xs,
            (lo + hi) / 2,
            yerr=(hi - lo) / 2,
            fmt="none",
            ecolor=fg,
            elinewidth=1.6,
            capsize=5,
            capthick=1.6,
            label="training range",
        )
    ax.set_xticks(x, [f"stage {g.stage}" for g in gates])
    ax.set_ylim(0, 100)
    ax.set_ylabel("exact zeros (%)", fontsize=8)
    ax.set_title("How much each skip gate removes", fontsize=9, pad=18)
    # the legend sits between the title and the bars, never over them
    ax.legend(
        fontsize=7,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=3,
        frameon=False,
        borderaxespad=0.1,
        handlelength=1.2,
        columnspacing=1.0,
        labelcolor=fg,
    )
    style(ax, fg, bg)


def _lambda_bars(ax: Any, g: GateStage, fg: str, label: bool) -> None:
    ax.bar(np.arange(len(g.lam)), g.lam, color=LAM_COLOUR, width=0.9)
    ax.set_title(f"stage {g.stage}: λ per latent channel", fontsize=8)
    if g.zero_frac is None or len(g.zero_frac) != len(g.lam):
        return
    tw = ax.twinx()
    tw.plot(np.arange(len(g.zero_frac)), g.zero_frac, "o", ms=2.5, color=ZERO_COLOUR)
    tw.set_ylim(0, 1.05)
    tw.tick_params(labelsize=6, colors=fg)
    if label:
        tw.set_ylabel("zeros", fontsize=7, color=ZERO_COLOUR)
    for side in tw.spines.values():
        side.set_color(fg)


def _empty(ax: Any, text: str, fg: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, color=fg, transform=ax.transAxes)


# ---------------------------------------------------------------------------- fine-tuning


class LossPlot:
    """The fine-tuning curves: training loss per step, held-out Dice per evaluation, and
    a star on the state kept.

    Attributes:
        figure, canvas: the matplotlib figure and its Qt canvas.
        loss_line, dice_line, best_marker: the artists (their data are the points).
    """

    def __init__(self, colours: tuple[str, str]):
        self.figure, self.canvas = plot_canvas((4.0, 3.0), min_height=220)
        fg, bg = colours
        fig = self.figure
        fig.set_facecolor(bg)
        self.ax_loss = fig.add_subplot(2, 1, 1)
        self.ax_dice = fig.add_subplot(2, 1, 2, sharex=self.ax_loss)
        (self.loss_line,) = self.ax_loss.plot([], [], color=SCAN_COLOUR, lw=1.2)
        (self.dice_line,) = self.ax_dice.plot([], [], "o-", color=C_COLOUR, ms=4, lw=1.2)
        (self.best_marker,) = self.ax_dice.plot(
            [], [], "*", color=SLICE_COLOUR, ms=11, label="kept"
        )
        self.ax_loss.set_ylabel("loss", fontsize=8)
        self.ax_dice.set_ylabel("held-out Dice", fontsize=8)
        self.ax_dice.set_xlabel("step", fontsize=8)
        self.ax_dice.set_ylim(0, 1.02)
        for ax in (self.ax_loss, self.ax_dice):
            style(ax, fg, bg)
        fig.subplots_adjust(left=0.17, right=0.97, top=0.96, bottom=0.16, hspace=0.25)
        self.loss: list[tuple[int, float]] = []
        self.dice: list[tuple[int, float]] = []
        self.best: tuple[int, float] | None = None

    def reset(self) -> None:
        self.loss, self.dice, self.best = [], [], None
        self.draw()

    def add(self, p: Any) -> None:
        """Take one :class:`~napari_prosma.finetune.FinetuneProgress` report."""
        if p.phase == "train" and p.loss is not None:
            self.loss.append((p.step, p.loss))
        if p.holdout_dice is not None and p.phase in ("before", "eval"):
            self.dice.append((p.step, p.holdout_dice))
        if p.phase == "done" and p.holdout_dice is not None:
            # the kept state: the first evaluation that reached the best held-out Dice
            top = max((d for _, d in self.dice), default=p.holdout_dice)
            step = next((s for s, d in self.dice if d >= top), p.step)
            self.best = (step, p.holdout_dice)

    def draw(self) -> None:
        def xy(points: list[tuple[int, float]]) -> tuple[list[float], list[float]]:
            return [p[0] for p in points], [p[1] for p in points]

        self.loss_line.set_data(*xy(self.loss))
        self.dice_line.set_data(*xy(self.dice))
        self.best_marker.set_data(*xy([self.best] if self.best else []))
        self.ax_loss.relim()
        self.ax_loss.autoscale_view()
        if self.loss or self.dice:
            right = max([p[0] for p in self.loss + self.dice] + [1])
            self.ax_loss.set_xlim(0, right * 1.03)
        self.canvas.draw_idle()


def c_note(result: Any, per_slice: bool) -> str:
    """What the gate inspector's channel-gate plots refer to (``result``, a
    :class:`~napari_prosma.inference.plan.SegResult`: the whole volume, the current slice,
    or the slice segmented)."""
    if len(result.plan.grid) == 3 and result.plan.mode == "image":
        return (
            "c is one vector for the whole volume: a 3D model's channel gate pools over "
            "each 3D tile. The exact-zero numbers follow the current slice."
        )
    if per_slice:
        return "c and the exact zeros follow the current slice."
    if result.plan.mode == "slice":
        return f"Gates of slice {result.plan.slice_index} (the slice that was segmented)."
    return ""
