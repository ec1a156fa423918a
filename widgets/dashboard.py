"""``FitDashboard``: set up, run, watch and read a torchem fit in Jupyter.

The fit runs in a background thread, so the notebook stays responsive; the
EM ``callback`` of :meth:`torchem.EMModel.fit` feeds the progress bar and the
live plot after every iteration and checks the Stop flag.  Every widget
update from that thread is a plain trait assignment (no ``with output:``
capture and no pyplot), which Jupyter sends to the browser as it happens.
"""
from __future__ import annotations

import base64
import html
import threading
import time
import traceback
from typing import Any, Callable, Mapping

import ipywidgets as W
import numpy as np
import pandas as pd
import torch

from torchem import EMModel, ModelComparison, SubjectBatch, ppc
from torchem.api import convergence_text
from torchem.em import IterationState
from torchem.groups import FAMILIES
from torchem.options import FitOptions

from ._figures import comparison_figure, empty_figure, figure_output, history_figure, ppc_figure, recovery_figure
from .data_loader import DataLoader, _error_html

__all__ = ["FitDashboard"]

_TABLES = ("torchem-results", "torchem-comparison", "torchem-group")
_TABLE_CSS = ("<style>" + ", ".join(f"table.{t}" for t in _TABLES) + " {border-collapse: collapse; font-size: 12px}"
              + ", ".join(f" .{t} th, .{t} td" for t in _TABLES) + " {padding: 1px 6px; text-align: right}"
              + ", ".join(f" .{t} tbody tr:nth-child(odd)" for t in _TABLES) + " {background: #f3f5f7}</style>")
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _model_name(obj: Any) -> str:
    fn = obj.fit_func if isinstance(obj, EMModel) else obj
    name = getattr(fn, "__name__", type(fn).__name__)
    return name[:-4] if name.endswith("_fit") else name


def _library_models() -> dict[str, Callable]:
    from torchem.models import MODELS
    return dict(MODELS)


def _group_table(res, natural: pd.DataFrame) -> pd.DataFrame:
    """The group's location and SD (normalized), the location in natural space, and the subjects' natural spread."""
    table = res.group_df().rename(columns={"mu": "mu (normalized)", "sd": "sd (normalized)"})
    table["subjects' mean (natural)"] = natural.mean(0).to_numpy()
    table["subjects' SD (natural)"] = natural.std(0, ddof=1).to_numpy() if len(natural) > 1 else np.nan
    return table


def _warning_html(text: str) -> str:
    """One warning line of the results summary."""
    return f"<span class='torchem-warning' style='color:#a65e00'>warning: {html.escape(text)}</span>"


def _download_link(df: pd.DataFrame, filename: str) -> str:
    """An HTML link that downloads ``df`` as a CSV file (a data URI: works in Jupyter, JupyterLab and Voila)."""
    payload = base64.b64encode(df.to_csv().encode()).decode("ascii")
    return (f'<a class="torchem-download" download="{html.escape(filename)}" '
            f'href="data:text/csv;base64,{payload}">&#x2B07; download the per-subject table ({html.escape(filename)})'
            "</a>")


class FitDashboard(W.VBox):
    """Pick a model, set the fit options, fit in the background and read the results.

    Parameters
    ----------
    model_or_models : EMModel, fit_func, list or dict of them, optional
        The candidate models: ``EMModel`` instances (their data is used when
        ``data`` is not given), library or custom ``fit_func``s, or a dict
        ``{name: model}``.  Default: the built-in library
        (``torchem.models.MODELS``).
    data : list, DataFrame or SubjectBatch, optional
        Anything :class:`torchem.EMModel` takes.  A DataFrame without
        ``data_kwargs`` is opened in the Data tab to map its columns.
        Without data (and without ``EMModel``s) the Data tab takes a CSV upload.
    data_kwargs : dict, optional
        DataFrame input: ``subject``, ``columns``, ``block``, ``trial``.
    true_params : ndarray or dict, optional
        Generating (natural-space) parameters of simulated data, ``(S, P)``,
        or ``{model name: array}``; the results then show a recovery plot.
    model_kwargs : dict, optional
        Extra :class:`torchem.EMModel` arguments for ``fit_func`` candidates
        (``param_names``, ``param_xform``, ``per_subject``), or
        ``{model name: {...}}``.
    fit_kwargs : dict, optional
        Further :meth:`torchem.EMModel.fit` options (e.g. ``estep_maxit``).
    ibic_nsamples : int
        Draws per subject for the integrated BIC in the results.
    max_table_rows : int
        Rows of the per-subject table rendered (``results_df`` keeps all).
    plot_interval : float
        Least seconds between two redraws of the live plot.

    Attributes
    ----------
    state : str
        ``"idle"``, ``"running"``, ``"done"``, ``"stopped"`` or ``"error"``.
    history : list of IterationState
        One entry per EM iteration of the current (or last) fit.
    result : FitResult or None
        The last fit's result (partial when stopped).
    fitted : dict
        ``{model name: EMModel}`` fitted to the current data.
    results_df : DataFrame or None
        Per-subject table of the last fit.
    summary : dict
        LME, iBIC, convergence and warnings of the last fit.
    group_table : DataFrame or None
        Group mean and SD (normalized), the mean mapped to natural space and
        the subjects' natural-space mean and SD, one row per parameter.
    error : str or None
        The last error shown.
    """

    def __init__(self, model_or_models: Any = None, data: Any = None, *, data_kwargs: Mapping | None = None,
                 true_params: np.ndarray | Mapping[str, np.ndarray] | None = None,
                 model_kwargs: Mapping | None = None, fit_kwargs: Mapping | None = None,
                 ibic_nsamples: int = 500, max_table_rows: int = 200, plot_interval: float = 0.5) -> None:
        self.candidates = self._candidates(model_or_models)
        self.true_params = true_params
        self.model_kwargs = dict(model_kwargs or {})
        self.fit_kwargs = dict(fit_kwargs or {})
        self.ibic_nsamples = int(ibic_nsamples)
        self.max_table_rows = int(max_table_rows)
        self.plot_interval = float(plot_interval)
        self.state = "idle"
        self.history: list[IterationState] = []
        self.result = None
        self.em_model: EMModel | None = None
        self.fitted: dict[str, EMModel] = {}
        self.results_df: pd.DataFrame | None = None
        self.comparison_df: pd.DataFrame | None = None
        self.summary: dict[str, Any] = {}
        self.group_table: pd.DataFrame | None = None
        self.error: str | None = None
        self._data: Any = data
        self._data_kwargs = dict(data_kwargs or {})
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_plot = 0.0

        # ---- controls
        names = list(self.candidates)
        self.model_picker = W.Dropdown(options=names, value=names[0], description="model")
        self.fit_all = W.Checkbox(value=False, description="fit every model and compare", indent=False)
        self.max_iter = W.BoundedIntText(value=200, min=1, max=100_000, description="max iter")
        self.conv_crit = W.BoundedFloatText(value=1e-3, min=1e-12, max=1e6, step=1e-3, description="conv. crit")
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        self.device = W.Dropdown(options=devices, value=devices[-1], description="device")
        self.dtype = W.Dropdown(options=list(_DTYPES), value="float64", description="dtype")
        self.seed = W.IntText(value=0, description="seed")
        self.group = W.Dropdown(options=sorted(FAMILIES), value="gaussian", description="group",
                                tooltip=FitOptions.__dataclass_fields__["group"].metadata["help"])
        self.fit_button = W.Button(description="Fit", button_style="success")
        self.stop_button = W.Button(description="Stop", button_style="danger", disabled=True)
        self.progress = W.IntProgress(value=0, min=0, max=self.max_iter.value, description=f"EM 0/{self.max_iter.value}",
                                      bar_style="info", layout=W.Layout(width="420px"))
        self.progress.add_class("torchem-progress")
        self.status = W.HTML("<span class='torchem-status'>ready</span>")
        self.error_area = W.HTML()
        self.live_plot = W.Output(layout=W.Layout(min_height="120px"))
        self.results_summary = W.HTML("<i>no fit yet</i>")
        self.results_plot = W.Output()
        self.results_table = W.HTML()
        self.download = W.HTML()
        self.loader = DataLoader(model=self._candidate_fit_func(names[0]), on_batch=self._on_loader_batch)

        self.fit_button.on_click(self._on_fit)
        self.stop_button.on_click(self._on_stop)
        self.model_picker.observe(self._on_model_change, names="value")
        self.max_iter.observe(lambda c: None if self.state == "running" else setattr(self.progress, "max", c["new"]),
                              names="value")

        options = W.GridBox(
            [self.max_iter, self.conv_crit, self.seed, self.device, self.dtype, self.group],
            layout=W.Layout(grid_template_columns="repeat(3, 300px)"))
        self.tabs = W.Tab(children=[
            W.VBox([self.live_plot]),
            # the table scrolls inside its own box (both ways), so wide tables are never cut off
            W.VBox([self.results_summary, self.download,
                    W.Box([self.results_table], layout=W.Layout(max_height="420px", max_width="100%",
                                                                overflow="auto", margin="0 0 8px 0")),
                    self.results_plot]),
            self.loader,
        ])
        for i, title in enumerate(["Live", "Results", "Data"]):
            self.tabs.set_title(i, title)
        self.data_label = W.HTML()
        super().__init__([
            W.HTML("<h3 style='margin:4px 0'>torchem fit</h3>"),
            W.HBox([self.model_picker, self.fit_all]),
            self.data_label,
            options,
            W.HBox([self.fit_button, self.stop_button, self.progress, self.status]),
            self.error_area,
            self.tabs,
        ])
        self.add_class("torchem-dashboard")
        self._init_data()

    # ------------------------------------------------------------------ models
    @staticmethod
    def _candidates(obj: Any) -> dict[str, Any]:
        if obj is None:
            return _library_models()
        if isinstance(obj, Mapping):
            out = dict(obj)
        else:
            items = obj if isinstance(obj, (list, tuple)) else [obj]
            out = {}
            for item in items:
                name, k = _model_name(item), 2
                while name in out:
                    name, k = f"{_model_name(item)}_{k}", k + 1
                out[name] = item
        if not out:
            raise ValueError("no models given")
        for name, m in out.items():
            if not (isinstance(m, EMModel) or callable(m)):
                raise TypeError(f"model {name!r} is neither an EMModel nor a fit_func")
        return out

    def _candidate_fit_func(self, name: str) -> Callable:
        m = self.candidates[name]
        return m.fit_func if isinstance(m, EMModel) else m

    def _kwargs_for(self, name: str) -> dict:
        kw = self.model_kwargs
        if name in kw and isinstance(kw[name], Mapping):
            return dict(kw[name])
        return {k: v for k, v in kw.items() if not isinstance(v, Mapping)}

    def _build_model(self, name: str, device: str, dtype: torch.dtype) -> EMModel:
        """An EMModel of candidate ``name`` on the current data, device and dtype."""
        cand = self.candidates[name]
        data = self._data
        if isinstance(cand, EMModel):
            if data is None and cand.device == torch.device(device) and cand.dtype == dtype:
                cand.result = None
                return cand
            return cand.with_data(cand.batch if data is None else data, device=device, dtype=dtype,
                                  **(self._data_kwargs if isinstance(data, pd.DataFrame) else {}))
        if data is None:
            raise ValueError("no data: load a CSV in the Data tab (or pass data=...)")
        kw = self._kwargs_for(name)
        if isinstance(data, pd.DataFrame):
            kw.update(self._data_kwargs)
        return EMModel(data, cand, device=device, dtype=dtype, **kw)

    # -------------------------------------------------------------------- data
    def _init_data(self) -> None:
        data = self._data
        if isinstance(data, pd.DataFrame) and not self._data_kwargs:
            self._data = None
            self.loader.set_dataframe(data, "data frame")
            self.loader.build()
            self.tabs.selected_index = 2
        elif data is None and not any(isinstance(m, EMModel) for m in self.candidates.values()):
            self.tabs.selected_index = 2
        self._describe_data()

    def set_data(self, data: Any, **data_kwargs: Any) -> None:
        """Use new data for the next fits (fits on the old data are forgotten)."""
        self._data = data
        self._data_kwargs = dict(data_kwargs)
        self.fitted = {}
        self._describe_data()

    def _on_loader_batch(self, batch: SubjectBatch, _loader: DataLoader) -> None:
        self.set_data(batch)

    def _describe_data(self) -> None:
        d = self._data
        if isinstance(d, SubjectBatch):
            text = f"data: {d.n_subjects} subjects, trial shape {tuple(d.trial_shape)}"
        elif isinstance(d, pd.DataFrame):
            text = f"data: data frame, {len(d)} rows"
        elif d is not None:
            text = f"data: {len(d)} subjects"
        else:
            ems = [m for m in self.candidates.values() if isinstance(m, EMModel)]
            text = (f"data: the models' own ({ems[0].batch.n_subjects} subjects)" if ems
                    else "data: none yet (Data tab)")
        self.data_label.value = f"<span class='torchem-data'>{html.escape(text)}</span>"

    def _on_model_change(self, change: dict) -> None:
        self.loader.set_model(self._candidate_fit_func(change["new"]))

    # --------------------------------------------------------------------- fit
    def fit(self) -> None:
        """Start fitting in the background (what the Fit button does)."""
        self._on_fit(None)

    def stop(self) -> None:
        """Ask the running fit to stop after its current iteration (the Stop button)."""
        self._on_stop(None)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the background fit has ended; ``False`` on timeout."""
        t = self._thread
        if t is not None:
            t.join(timeout)
            return not t.is_alive()
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _on_fit(self, _button: Any) -> None:
        if self.running:
            return
        names = list(self.candidates) if self.fit_all.value else [self.model_picker.value]
        opts = dict(self.fit_kwargs)
        opts.update(mstep_maxit=int(self.max_iter.value), convergence_crit=float(self.conv_crit.value),
                    seed=int(self.seed.value), group=self.group.value)
        device, dtype = self.device.value, _DTYPES[self.dtype.value]
        self._stop.clear()
        self.history = []
        self.result = None
        self.error = None
        self.error_area.value = ""
        self._set_running(True)
        self.progress.max, self.progress.value, self.progress.bar_style = opts["mstep_maxit"], 0, "info"
        self.progress.description = f"EM 0/{opts['mstep_maxit']}"
        self.tabs.selected_index = 0
        # a re-fit starts from an empty plot, never from the previous fit's curve
        self.live_plot.outputs = (figure_output(empty_figure("waiting for the first EM iteration ...")),)
        self._thread = threading.Thread(target=self._run, args=(names, opts, device, dtype),
                                        name="torchem-fit", daemon=True)
        self._thread.start()

    def _on_stop(self, _button: Any) -> None:
        if self.running:
            self._stop.set()
            self.status.value = "<span class='torchem-status'>stopping after this iteration...</span>"

    def _set_running(self, running: bool) -> None:
        self.state = "running" if running else self.state
        for w in (self.fit_button, self.model_picker, self.fit_all, self.max_iter, self.conv_crit, self.seed,
                  self.device, self.dtype, self.group, self.loader.build_button):
            w.disabled = running
        self.stop_button.disabled = not running

    def _run(self, names: list[str], opts: dict, device: str, dtype: torch.dtype) -> None:
        """The background thread: fit each model in turn, then fill the results."""
        name = names[0]
        try:
            for k, name in enumerate(names):
                tag = f"{name} ({k + 1}/{len(names)})" if len(names) > 1 else name
                self._status(f"building {tag} ...")
                em = self._build_model(name, device, dtype)
                self.em_model = em
                self.history = []
                self._last_plot = 0.0
                self._status(f"fitting {tag} on {em.batch.n_subjects} subjects ({device}, {dtype}) ...")
                callback = self._make_callback(em, tag)
                result = em.fit(verbose=0, callback=callback, **opts)
                self.result = result
                self.fitted[name] = em
                self._draw_live(em, tag, force=True)
                if result.stopped:
                    break
            self._finish(name)
        except Exception as exc:  # noqa: BLE001 - every failure is shown in the dashboard
            self._show_error(exc, name)
        finally:
            self._set_running(False)

    def _make_callback(self, em: EMModel, tag: str) -> Callable[[IterationState], bool]:
        def callback(state: IterationState) -> bool:
            self.history.append(state)
            top = max(state.max_iterations, state.iteration)
            if self.progress.max != top:
                self.progress.max = top
            self.progress.value = state.iteration
            self.progress.description = f"EM {state.iteration}/{state.max_iterations}"
            self._status(f"{html.escape(tag)}: iteration {state.iteration}, NPL {state.npl:.3f}"
                         + (f", {state.n_estep_failed} E-step failures" if state.n_estep_failed else ""))
            self._draw_live(em, tag)
            return not self._stop.is_set()

        return callback

    def _history_frame(self, em: EMModel) -> pd.DataFrame:
        rows = []
        for s in list(self.history):
            row = {"iteration": s.iteration, "NPL": s.npl}
            row.update({f"mu[{n}]": float(v) for n, v in zip(em.param_names, s.mu)})
            row.update({f"sigma[{n}]": float(v) for n, v in zip(em.param_names, s.sigma)})
            rows.append(row)
        return pd.DataFrame(rows)

    def _draw_live(self, em: EMModel, tag: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_plot < self.plot_interval:
            return
        self._last_plot = now
        fig = history_figure(self._history_frame(em), em.param_names, title=tag)
        self.live_plot.outputs = (figure_output(fig),)

    def _status(self, text: str) -> None:
        self.status.value = f"<span class='torchem-status'>{text}</span>"

    # ----------------------------------------------------------------- results
    def _finish(self, name: str) -> None:
        em, res = self.em_model, self.result
        n = res.n_iter
        converged, stopped = bool(res.convergence), bool(res.stopped)
        self.progress.max = max(n, 1)
        self.progress.value = n
        self.progress.description = f"EM {n}/{n}"
        self.progress.bar_style = "success" if converged else "warning"
        self._status(f"{html.escape(name)}: computing evidence ...")
        lap, lme, good = em.compute_lme()
        ibic = em.compute_integrated_bic(nsamples=self.ibic_nsamples, seed=0)
        warnings = em.warnings
        self.summary = {"model": name, "n_subjects": res.n_subjects, "n_iter": n, "converged": converged,
                        "stopped": stopped, "NPL": float(res.NPL.sum()), "LME": float(lme), "iBIC": float(ibic),
                        "hessian_bad": int((~res.hessian_ok).sum()),
                        "estep_failed": int((~res.estep_success).sum()), "warnings": warnings}
        df = res.subject_table()
        self.results_df = df
        self.group_table = _group_table(res, df[em.param_names])

        figures = []
        truth = self.true_params.get(name) if isinstance(self.true_params, Mapping) else self.true_params
        if truth is not None:
            truth = np.asarray(truth, dtype=float)
            if truth.shape == (res.n_subjects, res.n_params):
                figures.append(recovery_figure(truth, df[em.param_names].to_numpy(), em.param_names))
        self.comparison_df = None
        if len(self.fitted) >= 2 and not stopped:
            self._status("comparing the fitted models ...")
            mc = ModelComparison(list(self.fitted.values()), list(self.fitted))
            self.comparison_df = mc.compare(bicint_kwargs={"nsamples": self.ibic_nsamples})
            figures.append(comparison_figure(self.comparison_df))
        figures.append(history_figure(res.history, em.param_names, title=f"{name}: EM history", figsize=(7.5, 3.0)))
        figures.extend(self._posterior_predictive(em, name))
        self.results_plot.outputs = tuple(figure_output(f) for f in figures)

        state = html.escape(convergence_text(res))
        lines = [f"<b>{html.escape(name)}</b>: {res.n_subjects} subjects, "
                 + (state if converged else f"<b class='torchem-not-converged' style='color:#a65e00'>{state}</b>"),
                 f"summed NPL {self.summary['NPL']:.3f} &nbsp; LME (Laplace) <b>{lme:.3f}</b> &nbsp; "
                 f"iBIC ({self.ibic_nsamples} samples) <b>{ibic:.3f}</b>"]
        if self.summary["hessian_bad"] or self.summary["estep_failed"]:
            lines.append(f"non-PD Hessians {self.summary['hessian_bad']}, "
                         f"E-step failures {self.summary['estep_failed']}")
        for w in warnings:
            lines.append(_warning_html(w))
        lines.append(_TABLE_CSS + "<b>Group</b>" + self.group_table.to_html(
            classes="torchem-group", float_format=lambda v: f"{v:.4f}", border=0))
        if self.comparison_df is not None:
            lines.append(_TABLE_CSS + "<b>Model comparison</b>" + self.comparison_df.to_html(
                classes="torchem-comparison", float_format=lambda v: f"{v:.3f}", border=0))
            lines.extend(_warning_html(w) for w in self.comparison_df.attrs.get("warnings", []))
        self.results_summary.value = "<br>".join(lines)
        self.download.value = _download_link(df, f"{name}_subjects.csv")
        shown = df.head(self.max_table_rows)
        note = (f"<i>first {self.max_table_rows} of {len(df)} subjects (all in <code>results_df</code> and the "
                "download)</i>" if len(df) > self.max_table_rows else "")
        self.results_table.value = (_TABLE_CSS + "<b>Per-subject parameters</b> " + note +
                                    shown.to_html(classes="torchem-results", float_format=lambda v: f"{v:.4f}",
                                                  border=0))
        self.state = "stopped" if stopped else "done"
        self._status(f"Fit {'stopped' if stopped else 'finished'}: {html.escape(name)}, {state}")
        self.tabs.selected_index = 1

    #: Replicates per subject of the posterior predictive check shown after a fit (0: none).
    ppc_nsims: int = 50
    #: The last posterior predictive check (``torchem.ppc.PPCResult``), or its error message.
    ppc_result: Any = None

    def _posterior_predictive(self, em: EMModel, name: str) -> list:
        """The posterior predictive check figure of a finished fit (none for models without a PPC family)."""
        self.ppc_result = None
        if self.ppc_nsims < 2 or self.result.stopped or ppc.family_of(em.model.fit_func) is None:
            return []
        self._status(f"{html.escape(name)}: posterior predictive check ...")
        try:
            self.ppc_result = em.ppc(nsims=self.ppc_nsims, seed=0, nsamples=1000)
        except Exception as exc:  # the check must not hide the fit's results
            self.ppc_result = f"posterior predictive check failed: {type(exc).__name__}: {exc}"
            return []
        return [ppc_figure(self.ppc_result)]

    def _show_error(self, exc: BaseException, name: str) -> None:
        self.state = "error"
        self.error = f"{type(exc).__name__}: {exc}"
        tb = html.escape("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        self.error_area.value = (_error_html(f"fitting {name} failed: {self.error}") +
                                 f"<details><summary>traceback</summary><pre style='font-size:11px'>{tb}</pre>"
                                 "</details>")
        self.progress.bar_style = "danger"
        self._status("error")
