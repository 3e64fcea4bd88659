"""The SHAP audit's plots: importance bars, the beeswarm and an image model's class maps, as PNG bytes."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

_PLOT_FEATURES = 20
# The class maps: inches per panel (width, height), colour bar and title strips, dots per inch,
# panels per row. Binary fractions times 80 dpi: the PNG's size is exact (160 x 180 px a panel).
_MAP_PANEL = (2.0, 2.25)
_MAP_BAR = 1.0
_MAP_TITLE = 0.5
_MAP_DPI = 80
_MAP_COLUMNS = 5


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def importance_plot(importance_by_output: dict[str, dict[str, float]], order: list[str], title: str) -> bytes:
    """A horizontal bar chart of mean |SHAP| per feature (stacked by class when there are several)."""
    from matplotlib.figure import Figure

    shown = list(reversed(order[:_PLOT_FEATURES]))
    fig = Figure(figsize=(8, 0.35 * len(shown) + 1.6))
    ax = fig.add_subplot()
    left = np.zeros(len(shown))
    for label, values in importance_by_output.items():
        widths = np.array([values.get(name, 0.0) for name in shown])
        ax.barh(shown, widths, left=left, label=label)
        left += widths
    if len(importance_by_output) > 1:
        ax.legend(title="class", loc="lower right", fontsize=9)
    ax.set_xlabel("mean |SHAP value|")
    ax.set_title(title, fontsize=11)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def beeswarm_plot(values: np.ndarray, data: np.ndarray, features: list[str], title: str) -> bytes:
    """shap's beeswarm of per-row values ``(rows, features)``, coloured by ``data`` (NaN: grey)."""
    import shap
    from matplotlib.figure import Figure

    shown = min(len(features), _PLOT_FEATURES)
    fig = Figure(figsize=(8, 0.4 * shown + 1.6))
    ax = fig.add_subplot()
    explanation = shap.Explanation(values=values, data=data, feature_names=features)
    with warnings.catch_warnings():
        # A categorical feature's colour column is all NaN (grey dots) and numpy says so.
        warnings.simplefilter("ignore", RuntimeWarning)
        shap.plots.beeswarm(explanation, max_display=shown, ax=ax, show=False, plot_size=None)
    ax.set_title(title, fontsize=11)
    return _png(fig)


def class_map_plot(maps: np.ndarray, labels: Sequence[str], counts: Sequence[int], title: str) -> bytes:
    """A grid of heatmaps, one per output, on one symmetric colour scale (red: towards the output).

    Five panels a row; the PNG is exactly ``160 * columns + 80`` by ``180 * rows + 40`` pixels.
    """
    from matplotlib.figure import Figure

    panels = len(maps)
    columns = min(_MAP_COLUMNS, panels)
    rows = math.ceil(panels / columns)
    pw, ph = _MAP_PANEL
    width, height = columns * pw + _MAP_BAR, rows * ph + _MAP_TITLE
    fig = Figure(figsize=(width, height), dpi=_MAP_DPI)
    limit = float(np.max(np.abs(maps))) if maps.size else 0.0
    limit = limit if limit > 0 else 1.0
    image = None
    for i in range(panels):
        r, c = divmod(i, columns)
        bottom = height - _MAP_TITLE - (r + 1) * ph
        ax = fig.add_axes(
            ((c * pw + 0.15) / width, (bottom + 0.1) / height, (pw - 0.3) / width, (ph - 0.5) / height)
        )
        image = ax.imshow(maps[i], cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_title(f"{labels[i]} (n={counts[i]})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if image is not None:
        bar = fig.add_axes(
            ((columns * pw + 0.1) / width, 0.3 / height, 0.15 / width, (height - _MAP_TITLE - 0.6) / height)
        )
        fig.colorbar(image, cax=bar).ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / height, va="top")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_MAP_DPI)
    return buf.getvalue()
