"""Matplotlib figures: recovery scatters and EM convergence."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["plot_scatter", "plot_recovery", "plot_history", "plot_matrix"]


def plot_scatter(x: Sequence[float], xlabel: str, y: Sequence[float], ylabel: str, ax=None,
                 identity: bool = True, title: str | None = None, **scatter_kwargs):
    """Scatter ``y`` against ``x`` with the identity line and Pearson r in the title.

    Parameters
    ----------
    x, y : array-like
        ``(n,)`` values (e.g. simulated and estimated parameters).
    xlabel, ylabel : str
        Axis labels.
    ax : matplotlib Axes, optional
        Axes to draw on; a new figure is made if omitted.
    identity : bool
        Draw the ``y = x`` line.
    title : str, optional
        Title prefix; ``r = ...`` is appended.

    Returns
    -------
    matplotlib.axes.Axes
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(x, y, s=scatter_kwargs.pop("s", 14), alpha=scatter_kwargs.pop("alpha", 0.7), **scatter_kwargs)
    if identity:
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([lo, hi], [lo, hi], color="0.4", lw=1, ls="--")
    r = np.corrcoef(x, y)[0, 1] if len(x) > 1 else float("nan")
    ax.set_title(f"{title + ': ' if title else ''}r = {r:.3f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return ax


def plot_recovery(true_params: np.ndarray, estimated_params: np.ndarray, param_names: Sequence[str],
                  figsize: tuple[float, float] | None = None):
    """One :func:`plot_scatter` per parameter: simulated against estimated (natural space).

    Parameters
    ----------
    true_params, estimated_params : ndarray
        ``(S, P)``.
    param_names : sequence of str
        ``P`` names.

    Returns
    -------
    matplotlib.figure.Figure
    """
    P = len(param_names)
    fig, axes = plt.subplots(1, P, figsize=figsize or (3.6 * P, 3.6), squeeze=False)
    for j, name in enumerate(param_names):
        plot_scatter(np.asarray(true_params)[:, j], f"simulated {name}", np.asarray(estimated_params)[:, j],
                     f"estimated {name}", ax=axes[0, j], title=name)
    fig.tight_layout()
    return fig


def plot_history(history, param_names: Sequence[str], figsize: tuple[float, float] | None = None):
    """EM convergence: summed NPL per iteration and each group mean with a +/- 1 SD band.

    Parameters
    ----------
    history : DataFrame
        ``FitResult.history``.
    param_names : sequence of str

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, (a0, a1) = plt.subplots(1, 2, figsize=figsize or (9, 3.4))
    it = history["iteration"].to_numpy()
    a0.plot(it, history["NPL"].to_numpy(), marker="o", ms=3)
    a0.set_xlabel("EM iteration")
    a0.set_ylabel("summed NPL")
    for name in param_names:
        mu = history[f"mu[{name}]"].to_numpy()
        sd = np.sqrt(history[f"sigma[{name}]"].to_numpy())
        (line,) = a1.plot(it, mu, label=name)
        a1.fill_between(it, mu - sd, mu + sd, color=line.get_color(), alpha=0.2)
    a1.set_xlabel("EM iteration")
    a1.set_ylabel("group mean +/- 1 SD (normalized)")
    a1.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_matrix(table, title: str = "", xlabel: str = "", ylabel: str = "", ax=None, cmap: str = "Blues",
                fmt: str = "{:.2f}"):
    """Annotated heat map of a DataFrame (rows and columns labelled from its index and columns).

    Returns
    -------
    matplotlib.figure.Figure
    """
    values = np.asarray(table, dtype=float)
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.2 * values.shape[1] + 2.4, 1.0 * values.shape[0] + 1.8))
    else:
        fig = ax.figure
    im = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=max(1.0, float(np.nanmax(values))))
    ax.set_xticks(range(values.shape[1]), [str(c) for c in table.columns])
    ax.set_yticks(range(values.shape[0]), [str(i) for i in table.index])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            dark = values[i, j] > 0.6 * im.norm.vmax
            ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", color="white" if dark else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig
