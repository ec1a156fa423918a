"""Thread-safe matplotlib figures for the widgets.

The dashboard draws from a background thread, so it never touches pyplot
(whose figure registry is not thread-safe and whose inline backend would show
stray figures in the notebook): every figure here is a bare
``matplotlib.figure.Figure`` rendered to PNG by the Agg canvas and handed to
an ``Output`` widget as display data.
"""
from __future__ import annotations

import base64
import io
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from torchem.plotting import plot_ppc, plot_scatter

__all__ = ["history_figure", "recovery_figure", "comparison_figure", "empty_figure", "ppc_figure", "figure_output",
           "figure_png"]


def history_figure(history: pd.DataFrame, param_names: Sequence[str], title: str = "",
                   figsize: tuple[float, float] = (9, 3.2)) -> Figure:
    """Summed NPL per iteration and each group mean with its +/- 1 SD band (as ``torchem.plotting.plot_history``)."""
    fig = Figure(figsize=figsize, layout="constrained")  # constrained layout keeps the title clear of the axes
    a0, a1 = fig.subplots(1, 2)
    if len(history):
        it = history["iteration"].to_numpy()
        a0.plot(it, history["NPL"].to_numpy(), marker="o", ms=3)
        for name in param_names:
            mu = history[f"mu[{name}]"].to_numpy(dtype=float)
            sd = np.sqrt(history[f"sigma[{name}]"].to_numpy(dtype=float))
            (line,) = a1.plot(it, mu, label=name)
            a1.fill_between(it, mu - sd, mu + sd, color=line.get_color(), alpha=0.2)
        a1.legend(fontsize="small", loc="best")
    a0.set_xlabel("EM iteration")
    a0.set_ylabel("summed NPL")
    a1.set_xlabel("EM iteration")
    a1.set_ylabel("group mean +/- 1 SD\n(normalized)")
    if title:
        fig.suptitle(title, fontsize="medium")
    return fig


def empty_figure(message: str, figsize: tuple[float, float] = (9, 3.2)) -> Figure:
    """A blank figure with a message (the live plot before a fit's first iteration)."""
    fig = Figure(figsize=figsize)
    fig.text(0.5, 0.5, message, ha="center", va="center", color="0.4")
    return fig


def recovery_figure(true_params: np.ndarray, estimated: np.ndarray, param_names: Sequence[str]) -> Figure:
    """Simulated against estimated parameters (natural space), one panel per parameter."""
    P = len(param_names)
    fig = Figure(figsize=(3.3 * P, 3.3))
    axes = np.atleast_1d(fig.subplots(1, P))
    for j, name in enumerate(param_names):
        plot_scatter(np.asarray(true_params)[:, j], f"simulated {name}", np.asarray(estimated)[:, j],
                     f"estimated {name}", ax=axes[j], title=name)
    fig.tight_layout()
    return fig


def comparison_figure(table: pd.DataFrame) -> Figure:
    """LME difference to the best model and protected exceedance probability per model."""
    fig = Figure(figsize=(8, 3.0), layout="constrained")
    a0, a1 = fig.subplots(1, 2)
    names = [str(n) for n in table.index]
    a0.bar(names, table["dLME"].to_numpy(dtype=float), color="tab:blue")
    a0.axhline(0, color="0.3", lw=0.8)
    a0.set_ylabel("LME - best LME (nats)")
    a1.bar(names, table["pxp"].to_numpy(dtype=float), color="tab:orange")
    a1.set_ylim(0, 1)
    a1.set_ylabel("protected exceedance\nprobability")
    return fig


def ppc_figure(ppc) -> Figure:
    """The group-level posterior predictive check of every built-in statistic (``torchem.plotting.plot_ppc``)."""
    fig = plot_ppc(ppc, fig=Figure())
    fig.set_size_inches(min(3.2 * len(ppc.statistics), 10.0), 3.0)
    fig.tight_layout()
    return fig


def figure_png(fig: Figure, dpi: int = 90) -> bytes:
    """PNG bytes of ``fig`` (Agg canvas; safe outside the main thread)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def figure_output(fig: Figure, dpi: int = 90) -> dict:
    """``fig`` as one display-data entry for ``ipywidgets.Output.outputs``."""
    png = base64.b64encode(figure_png(fig, dpi)).decode("ascii")
    return {"output_type": "display_data", "metadata": {},
            "data": {"image/png": png, "text/plain": "<torchem figure>"}}
