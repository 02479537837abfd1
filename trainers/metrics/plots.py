"""Metric plots as PNG files.

Figures are drawn on an explicit Agg canvas, so plotting works headless (Ray workers,
CI) and never switches the global matplotlib backend of the user's process.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MAX_LEGEND_CLASSES = 20  # beyond this, per-class lines are drawn grey and unlabelled


def _figure(figsize=(7, 5)):
    fig = Figure(figsize=figsize, tight_layout=True)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, save_path) -> Path:
    path = Path(save_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path


def plot_pr_curve(recall: np.ndarray, precision: np.ndarray, ap50: np.ndarray, names: list[str],
                  save_path) -> Path:
    """Precision-recall curves (IoU 0.5) per class and their mean."""
    fig, ax = _figure()
    labelled = len(names) <= MAX_LEGEND_CLASSES
    for row, name, ap in zip(precision, names, ap50):
        ax.plot(recall, row, linewidth=1, **({"label": f"{name} {ap:.3f}"} if labelled else {"color": "grey"}))
    if len(precision):
        ax.plot(recall, precision.mean(0), linewidth=3, color="blue",
                label=f"all classes {float(np.mean(ap50)):.3f} mAP@0.5")
    _finish(ax, "Recall", "Precision", "Precision-Recall curve")
    return _save(fig, save_path)


def plot_metric_curve(px: np.ndarray, curves: np.ndarray, names: list[str], save_path,
                      ylabel: str = "Metric") -> Path:
    """A metric against the confidence threshold, per class and averaged."""
    fig, ax = _figure()
    labelled = len(names) <= MAX_LEGEND_CLASSES
    for row, name in zip(curves, names):
        ax.plot(px, row, linewidth=1, **({"label": name} if labelled else {"color": "grey"}))
    if len(curves):
        mean = curves.mean(0)
        i = int(mean.argmax())
        ax.plot(px, mean, linewidth=3, color="blue",
                label=f"all classes {mean[i]:.2f} at {px[i]:.3f}")
    _finish(ax, "Confidence", ylabel, f"{ylabel}-Confidence curve")
    return _save(fig, save_path)


def _finish(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left", fontsize="small")


def plot_confusion_matrix(matrix: np.ndarray, names: list[str], save_path, normalize: bool = True) -> Path:
    """Heat map with predicted classes as rows and true classes as columns."""
    m = matrix.astype(np.float64)
    if normalize:
        m = m / np.maximum(m.sum(0, keepdims=True), 1e-9)
    n = len(names)
    fig, ax = _figure(figsize=(2 + 0.6 * n, 1.5 + 0.55 * n))
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(n), names, rotation=90)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("True")
    ax.set_ylabel("Predicted")
    ax.set_title("Confusion matrix" + (" (normalized)" if normalize else ""))
    if n <= 30:
        top = 1.0 if normalize else (m.max() if m.size else 0)
        for (i, j), v in np.ndenumerate(m):
            if v:
                ax.text(j, i, f"{v:.2f}" if normalize else f"{int(v)}", ha="center", va="center",
                        fontsize=7, color="white" if v > 0.5 * top else "black")
    return _save(fig, save_path)
