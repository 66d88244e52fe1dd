"""Plots logged as artifacts."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_layer_widths(history: Sequence[tuple[int, Mapping[str, int]]], path: str | Path,
                      title: str = "Layer widths during training") -> Path:
    """Render every layer's width (kept channels) against the training step as a PNG.

    Args:
        history: ``[(step, {layer_name: width}), ...]``; a layer missing from a later entry
            (a removed block) is drawn as width 0 from then on.
        path: where the PNG goes (parent folders are created).

    Example::

        plot_layer_widths([(0, {"layer1.0.conv1": 64}), (500, {"layer1.0.conv1": 41})], "w.png")
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    points = sorted(history, key=lambda e: e[0])
    names: list[str] = []
    for _, widths in points:
        names.extend(n for n in widths if n not in names)
    fig = Figure(figsize=(10, 6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = [s for s, _ in points]
    cmap = matplotlib.colormaps["viridis"]
    for i, name in enumerate(names):
        ys: list[float] = []
        appeared = False
        for _, widths in points:
            appeared = appeared or name in widths
            ys.append(float(widths[name]) if name in widths else (0.0 if appeared else math.nan))
        ax.step(steps, ys, where="post", linewidth=1, label=name,
                color=cmap(i / max(1, len(names) - 1)))
    ax.set_xlabel("step")
    ax.set_ylabel("width (channels)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if 0 < len(names) <= 20:
        ax.legend(fontsize=7, loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=100)
    return out
