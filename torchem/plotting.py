"""Matplotlib figures: recovery scatters and EM convergence."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from numpy.typing import ArrayLike

__all__ = ["plot_scatter", "plot_recovery", "plot_history", "plot_matrix", "plot_choices"]


def plot_scatter(x: Sequence[float], xlabel: str, y: Sequence[float], ylabel: str, ax=None,
                 identity: bool = True, title: str | None = None, *, show_line: bool | None = None,
                 equal_limits: bool = False, colorname: str | None = None, annotate: bool = False,
                 **scatter_kwargs):
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
        Draw the ``y = x`` line (pyEM's name: ``show_line``, which wins when given).
    title : str, optional
        Title prefix; ``r = ...`` is appended.
    equal_limits : bool
        Give both axes the same limits (pyEM's option).
    colorname : str, optional
        Marker colour (pyEM's name for matplotlib's ``color``).
    annotate : bool
        Also write ``Pearson r = ...`` in the upper left corner (as pyEM).
    **scatter_kwargs
        Passed to :meth:`matplotlib.axes.Axes.scatter` (``s``, ``alpha``, ...).

    Returns
    -------
    matplotlib.axes.Axes
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    if colorname is not None:
        scatter_kwargs.setdefault("color", colorname)
    ax.scatter(x, y, s=scatter_kwargs.pop("s", 14), alpha=scatter_kwargs.pop("alpha", 0.7), **scatter_kwargs)
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    if identity if show_line is None else show_line:
        ax.plot([lo, hi], [lo, hi], color="0.4", lw=1, ls="--")
    if equal_limits:
        pad = 0.05 * (hi - lo) if hi > lo else 1.0
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
    r = np.corrcoef(x, y)[0, 1] if len(x) > 1 else float("nan")
    if annotate:
        ax.annotate(f"Pearson r = {r:.2f}", xy=(0.05, 0.95), xycoords="axes fraction", va="top")
    ax.set_title(f"{title + ': ' if title else ''}r = {r:.3f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return ax


def plot_recovery(true_params: np.ndarray, estimated_params: np.ndarray, param_names: Sequence[str],
                  figsize: tuple[float, float] | None = None, show_line: bool = True):
    """One :func:`plot_scatter` per parameter: simulated against estimated (natural space).

    Parameters
    ----------
    true_params, estimated_params : ndarray
        ``(S, P)``.
    param_names : sequence of str
        ``P`` names.
    figsize : tuple, optional
        Figure size in inches.
    show_line : bool
        Draw the identity line in each panel.

    Returns
    -------
    matplotlib.figure.Figure
    """
    P = len(param_names)
    fig, axes = plt.subplots(1, P, figsize=figsize or (3.6 * P, 3.6), squeeze=False)
    for j, name in enumerate(param_names):
        plot_scatter(np.asarray(true_params)[:, j], f"simulated {name}", np.asarray(estimated_params)[:, j],
                     f"estimated {name}", ax=axes[0, j], title=name, identity=show_line)
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


def plot_choices(choices_A: ArrayLike, filename: str | None = None, ax=None):  # noqa: N803 - pyEM's name
    """Choice frequency of each option over trials, averaged over blocks and subjects (pyEM's ``plot_choices``).

    Parameters
    ----------
    choices_A : array-like
        ``(S, B, T)`` (or ``(S, T)``) 1 where option A was chosen, 0 where B was.
    filename : str, optional
        Also save the figure there (450 dpi).
    ax : matplotlib Axes, optional
        Axes to draw on.

    Returns
    -------
    matplotlib.figure.Figure
        Lines for A and B with a +/- 1 SEM band across subjects.
    """
    a = np.asarray(choices_A, dtype=float)
    if a.ndim == 2:
        a = a[:, None, :]
    if a.ndim != 3:
        raise ValueError(f"choices_A must be (subjects, blocks, trials) or (subjects, trials), got shape {a.shape}")
    per_subject = a.mean(1)  # (S, T)
    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3.4))
    else:
        fig = ax.figure
    trials = np.arange(1, a.shape[2] + 1)
    sem = per_subject.std(0, ddof=1) / np.sqrt(a.shape[0]) if a.shape[0] > 1 else np.zeros(a.shape[2])
    for label, freq in (("A", per_subject.mean(0)), ("B", 1.0 - per_subject.mean(0))):
        (line,) = ax.plot(trials, freq, label=label)
        ax.fill_between(trials, freq - sem, freq + sem, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("Trials")
    ax.set_ylabel("Choice Frequency")
    ax.legend()
    if filename:
        fig.savefig(filename, dpi=450, bbox_inches="tight")
    return fig
