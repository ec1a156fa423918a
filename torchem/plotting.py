"""Matplotlib figures: recovery scatters, EM convergence and posterior predictive checks."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["plot_scatter", "plot_recovery", "plot_history", "plot_matrix", "plot_choices", "plot_ppc"]


def _plt():
    """``matplotlib.pyplot``, imported at the first figure (it costs about a second of ``import torchem``)."""
    import matplotlib.pyplot as plt

    return plt


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
        _, ax = _plt().subplots(figsize=(4, 4))
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
    fig, axes = _plt().subplots(1, P, figsize=figsize or (3.6 * P, 3.6), squeeze=False)
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
    fig, (a0, a1) = _plt().subplots(1, 2, figsize=figsize or (9, 3.4))
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
        fig, ax = _plt().subplots(figsize=(1.2 * values.shape[1] + 2.4, 1.0 * values.shape[0] + 1.8))
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
        fig, ax = _plt().subplots(figsize=(5, 3.4))
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


def _ppc_panel(ax, table, unit: str, kind: str, colors: dict) -> None:
    """Observed values (markers) against the predictive mean and interval of every unit (group or subject)."""
    units = list(dict.fromkeys(table[unit]))
    width = 0.6 / max(len(units), 1)
    for k, u in enumerate(units):
        t = table[table[unit] == u]
        c = colors[u]
        x = t["x"].to_numpy(dtype=float)
        lo, mid, hi = (t[col].to_numpy(dtype=float) for col in ("lower", "mean", "upper"))
        obs = t["observed"].to_numpy(dtype=float)
        if kind == "curve":
            ax.fill_between(x, lo, hi, color=c, alpha=0.25, lw=0)
            ax.plot(x, mid, color=c, ls="--", lw=1)
            ax.plot(x, obs, color=c, marker="o", ms=3, lw=1, label=str(u))
        else:
            pos = x if kind == "fitted" else np.arange(len(t)) + (k - (len(units) - 1) / 2) * width
            ax.errorbar(pos, mid, yerr=[mid - lo, hi - mid], fmt="none", ecolor=c, elinewidth=3, alpha=0.35)
            ax.plot(pos, obs, ls="none", marker="o", ms=4, color=c, label=str(u))
    if kind == "points" and len(table):
        first = table[table[unit] == units[0]]
        ax.set_xticks(range(len(first)), [str(c) for c in first["cell"]], rotation=30 if len(first) > 3 else 0,
                      ha="right" if len(first) > 3 else "center", fontsize="small")
    if kind == "fitted" and len(table):
        lo_hi = table[["x", "observed"]].to_numpy(dtype=float)
        lo_hi = lo_hi[np.isfinite(lo_hi).all(1)]
        if lo_hi.size:
            a, b = float(lo_hi.min()), float(lo_hi.max())
            ax.plot([a, b], [a, b], color="0.5", lw=1, ls=":")


def plot_ppc(ppc, statistics: Sequence[str] | None = None, subjects: Sequence = (), groups=None,
             interval: float = 0.95, bins: int = 10, fig=None, figsize: tuple[float, float] | None = None):
    """Observed summary statistics against their posterior predictive band.

    The first row shows every statistic averaged over the subjects of each
    group (one colour per group); each further row one selected subject.
    Learning curves are drawn as lines (observed, with markers) over the
    predictive interval (shaded) and mean (dashed); other statistics as
    observed points over interval bars; per-trial statistics as observed
    against fitted, binned by the fitted value (dotted: identity).

    Parameters
    ----------
    ppc : PPCResult
        From :meth:`EMModel.ppc`.
    statistics : list of str, optional
        Statistics to draw (default all).
    subjects : sequence
        Subject ids to draw one row each for.
    groups : Series, dict or array, optional
        Group label per subject (e.g. patients / controls); default one group.
    interval : float
        Central predictive interval.
    bins : int
        Bins of the fitted value for per-trial statistics.
    fig : matplotlib Figure, optional
        Draw into this (e.g. a bare ``matplotlib.figure.Figure`` off the pyplot registry).

    Returns
    -------
    matplotlib.figure.Figure
    """
    names = list(statistics or ppc.statistics)
    subjects = list(subjects)
    unknown = [s for s in subjects if s not in ppc.subject_ids]
    if unknown:
        raise ValueError(f"unknown subject(s) {unknown}")
    group = ppc.summary("group", groups, interval, bins, names)
    per_subject = ppc.summary("subject", None, interval, bins, names) if subjects else None
    nrows, ncols = 1 + len(subjects), len(names)
    size = figsize or (3.6 * ncols, 3.0 * nrows)
    if fig is None:
        fig, axes = _plt().subplots(nrows, ncols, figsize=size, squeeze=False)
    else:
        fig.set_size_inches(*size)
        axes = fig.subplots(nrows, ncols, squeeze=False)
    cycle = _plt().rcParams["axes.prop_cycle"].by_key()["color"]
    g_colors = {g: cycle[k % len(cycle)] for k, g in enumerate(dict.fromkeys(group["group"]))}
    for j, name in enumerate(names):
        st = ppc.statistics[name]
        ax = axes[0, j]
        _ppc_panel(ax, group[group["statistic"] == name], "group", st.kind, g_colors)
        ax.set_title(name, fontsize="medium")
        if len(g_colors) > 1 and j == 0:
            ax.legend(fontsize="small")
        for r, sid in enumerate(subjects, start=1):
            t = per_subject[(per_subject["statistic"] == name) & (per_subject["subject"] == sid)]
            _ppc_panel(axes[r, j], t, "subject", st.kind, {sid: cycle[0]})
            axes[r, j].set_title(f"{name}: subject {sid}", fontsize="small")
        for r in range(nrows):
            axes[r, j].set_xlabel(st.xlabel if st.kind != "fitted" else "fitted")
        axes[0, j].set_ylabel("observed" if st.kind == "fitted" else "")
    fig.suptitle(f"Posterior predictive check ({ppc.nsims} replicates per subject, draws: {ppc.draws}; "
                 f"{int(round(100 * interval))}% intervals)", fontsize="medium")
    fig.tight_layout()
    return fig
