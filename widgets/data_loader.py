"""``DataLoader``: a CSV upload that becomes a validated ``SubjectBatch``."""
from __future__ import annotations

import html
import re
from typing import Any, Callable, Sequence

import ipywidgets as W
import pandas as pd

from torchem import SubjectBatch
from torchem.data import parse_columns, read_table
from torchem.model import Model, data_roles

__all__ = ["DataLoader"]

NONE = "(none)"


def _error_html(message: str) -> str:
    return (f'<div class="torchem-error" style="color:#a40000;background:#fdecea;border:1px solid #f5c2c0;'
            f'padding:4px 8px;border-radius:3px;white-space:pre-wrap">{html.escape(message)}</div>')


def _ok_html(message: str) -> str:
    return f'<div class="torchem-ok" style="color:#1e6b2a">{html.escape(message)}</div>'


def _guess_group(columns: Sequence[str], wanted: str) -> str | None:
    """``"[x0, x1, x2]"`` when ``wanted`` (e.g. ``X``) has numbered columns ``x0, x1, ...`` (at least two)."""
    pattern = re.compile(rf"^{re.escape(wanted.lower())}_?(\d+)$")
    numbered = sorted((int(m.group(1)), c) for c in columns if (m := pattern.match(str(c).lower())))
    return "[" + ", ".join(c for _, c in numbered) + "]" if len(numbered) >= 2 else None


def _guess(columns: Sequence[str], wanted: str, default: str | None = None) -> str | None:
    """The column whose name matches ``wanted`` (case, plural and common synonyms ignored)."""
    synonyms = {
        "subject": ["subject", "subj", "sub", "participant", "id", "subject_id"],
        "block": ["block", "run", "session"],
        "trial": ["trial", "trial_index", "t"],
        "choices": ["choice", "choices", "action", "response", "resp"],
        "rewards": ["reward", "rewards", "outcome", "feedback"],
    }
    w = wanted.lower()
    candidates = synonyms.get(w, []) + [w, w.rstrip("s"), w + "s"]
    lower = {str(c).lower(): c for c in columns}
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    return default


class DataLoader(W.VBox):
    """Upload a long CSV (one row per trial), map its columns, preview it and build a ``SubjectBatch``.

    Parameters
    ----------
    fields : sequence of str, optional
        Names of the model's data fields in the order the model takes them
        (e.g. ``["choices", "rewards"]``); one column box is shown per field,
        which takes a column or a bracketed group of columns stacked into one
        field (``[x0, x1, x2]`` for a regression's predictors).  Without it,
        a text box takes all data columns (``choice, reward``).
    model : callable, optional
        A ``fit_func`` (or :class:`torchem.model.Model`); its declared
        ``inputs`` give ``fields`` and its data check runs on the built batch.
    df : DataFrame, optional
        Data to start from instead of an upload.
    on_batch : callable, optional
        ``on_batch(batch, loader)`` after a batch was built successfully.

    Attributes
    ----------
    df : DataFrame or None
        The uploaded table.
    batch : SubjectBatch or None
        The last batch built.
    error : str or None
        The last validation error shown.
    """

    def __init__(self, fields: Sequence[str] | None = None, model: Callable | Model | None = None,
                 df: pd.DataFrame | None = None, on_batch: Callable[[SubjectBatch, "DataLoader"], Any] | None = None,
                 preview_rows: int = 5) -> None:
        self.df: pd.DataFrame | None = None
        self.batch: SubjectBatch | None = None
        self.error: str | None = None
        self.preview_rows = preview_rows
        self._check: Callable | None = None
        self._callbacks: list[Callable] = [on_batch] if on_batch is not None else []
        self._fields: list[str] = []

        self.upload = W.FileUpload(accept=".csv,.tsv,.txt,text/csv,text/tab-separated-values", multiple=False,
                                   description="CSV/TSV file")
        self.file_label = W.HTML("<i>no file loaded</i>")
        self.subject = W.Dropdown(description="subject", options=[NONE])
        self.block = W.Dropdown(description="block", options=[NONE])
        self.trial = W.Dropdown(description="trial", options=[NONE])
        self.field_box = W.VBox()
        self.field_dropdowns: dict[str, W.Combobox] = {}
        self.columns_text = W.Text(description="columns", placeholder="choice, reward (in the model's order)")
        self.first_option = W.Checkbox(value=False, indent=False,
                                       description="options coded from 1 (1, 2, ... -> 0, 1, ...)")
        self.skip_missing = W.Checkbox(value=False, indent=False,
                                       description="skip missed trials (an empty choice)")
        self.preview = W.HTML()
        self.build_button = W.Button(description="Use this data", button_style="primary")
        self.message = W.HTML()

        self.upload.observe(self._on_upload, names="value")
        self.build_button.on_click(lambda _b: self.build())
        self.set_model(model, fields)
        mapping = W.VBox([W.HTML("<b>Columns</b>"), self.subject, self.block, self.trial, self.field_box,
                          W.HTML("<small>a field may take several columns: <code>[x0, x1, x2]</code></small>"),
                          self.first_option, self.skip_missing],
                         layout=W.Layout(min_width="330px"))
        super().__init__([
            W.HBox([self.upload, self.file_label]),
            W.HBox([mapping, W.VBox([W.HTML("<b>Preview</b>"), self.preview],
                                    layout=W.Layout(overflow="auto", max_width="640px"))]),
            W.HBox([self.build_button]),
            self.message,
        ])
        if df is not None:
            self.set_dataframe(df)

    # ------------------------------------------------------------ set-up
    def on_batch(self, callback: Callable[[SubjectBatch, "DataLoader"], Any]) -> None:
        """Register ``callback(batch, loader)``, called after every successful build."""
        self._callbacks.append(callback)

    def set_model(self, model: Callable | Model | None = None, fields: Sequence[str] | None = None) -> None:
        """Use ``model``'s data fields (and data check); ``fields`` overrides its declared inputs."""
        fit_func = model.fit_func if isinstance(model, Model) else model
        self._check = getattr(fit_func, "check_data", None)
        self._roles = data_roles(fit_func) if fit_func is not None else ([], [])
        if fields is None and fit_func is not None:
            fields = getattr(fit_func, "inputs", None)
        self._fields = list(fields or [])
        # the recodings are offered only where the model defines them
        self.first_option.disabled = not self._roles[0]
        self.skip_missing.disabled = not self._roles[1]
        self.first_option.value &= not self.first_option.disabled
        self.skip_missing.value &= not self.skip_missing.disabled
        self.field_dropdowns = {f: W.Combobox(description=f, options=self._options(False), ensure_option=False,
                                              placeholder="column or [col1, col2]")
                                for f in self._fields}
        self.field_box.children = tuple(self.field_dropdowns.values()) if self._fields else (self.columns_text,)
        self._guess_mapping()

    def set_dataframe(self, df: pd.DataFrame, name: str = "data frame") -> None:
        """Load a table (what an upload does after parsing the CSV)."""
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"expected a pandas DataFrame, got {type(df).__name__}")
        self.df = df
        self.batch = None
        self.file_label.value = html.escape(f"{name}: {len(df)} rows x {df.shape[1]} columns")
        for dd, optional in ((self.subject, False), (self.block, True), (self.trial, True)):
            dd.options = self._options(optional)
        for dd in self.field_dropdowns.values():
            dd.options = self._options(False)
        self._guess_mapping()
        self.preview.value = df.head(self.preview_rows).to_html(classes="torchem-preview", border=0)
        self.message.value = ""
        self.error = None

    def load_csv(self, content: bytes | str, name: str = "upload.csv") -> None:
        """Parse CSV (or TSV, ...: the separator is sniffed) text or bytes and load it; a parse error is shown."""
        try:
            df = read_table(content.encode() if isinstance(content, str) else content)
        except Exception as exc:  # noqa: BLE001 - every parse problem is shown to the user
            self._show_error(f"could not read {name}: {exc}")
            return
        self.set_dataframe(df, name)

    # ----------------------------------------------------------- mapping
    def _options(self, optional: bool) -> list[str]:
        cols = [str(c) for c in self.df.columns] if self.df is not None else []
        return ([NONE] + cols) if optional or not cols else cols

    def _guess_mapping(self) -> None:
        if self.df is None:
            return
        cols = [str(c) for c in self.df.columns]
        self.subject.value = _guess(cols, "subject", cols[0])
        self.block.value = _guess(cols, "block", NONE)
        self.trial.value = _guess(cols, "trial", NONE)
        used = {self.subject.value, self.block.value, self.trial.value}
        rest = [c for c in cols if c not in used]
        for k, (f, dd) in enumerate(self.field_dropdowns.items()):
            dd.value = _guess(cols, f) or _guess_group(cols, f) or (rest[k] if k < len(rest) else cols[-1])
        if not self._fields and not self.columns_text.value:
            self.columns_text.value = ", ".join(rest)

    @property
    def mapping(self) -> dict[str, Any]:
        """The chosen columns and codings as ``SubjectBatch.from_dataframe`` keywords."""
        if self._fields:
            columns = [entry for dd in self.field_dropdowns.values() for entry in parse_columns(dd.value)
                       if entry]
        else:
            columns = [c for c in parse_columns(self.columns_text.value) if c]
        groups, responses = self._roles
        return {"subject": self.subject.value,
                "columns": columns,
                "block": None if self.block.value in (NONE, None) else self.block.value,
                "trial": None if self.trial.value in (NONE, None) else self.trial.value,
                "categorical": groups, "responses": responses,
                "missing": "skip" if self.skip_missing.value else "error",
                "first_option": int(self.first_option.value)}

    # ------------------------------------------------------------- build
    def build(self) -> SubjectBatch | None:
        """Build and validate the batch; errors are shown in place and ``None`` is returned."""
        if self.df is None:
            self._show_error("load a CSV file first")
            return None
        kw = self.mapping
        try:
            if not kw["columns"]:
                raise ValueError("choose the data columns")
            if self._fields and len(kw["columns"]) != len(self._fields):
                raise ValueError(f"{len(kw['columns'])} fields for the model's {len(self._fields)} "
                                 f"({', '.join(self._fields)}); one entry per field")
            used = [c for entry in kw["columns"] for c in ([entry] if isinstance(entry, str) else entry)]
            roles = [kw["subject"], *used] + [c for c in (kw["block"], kw["trial"]) if c]
            dup = sorted({c for c in roles if roles.count(c) > 1})
            if dup:
                raise ValueError(f"column(s) {dup} are mapped to more than one role")
            batch = SubjectBatch.from_dataframe(self.df, **kw)
            if self._check is not None:
                self._check(batch)
        except Exception as exc:  # noqa: BLE001 - shown to the user in place
            self.batch = None
            self._show_error(f"{type(exc).__name__}: {exc}")
            return None
        self.batch = batch
        self.error = None
        shape = " x ".join(str(s) for s in batch.trial_shape)
        self.message.value = _ok_html(f"{batch.n_subjects} subjects, trial shape {shape}, "
                                      f"{int(batch.n_obs.sum())} observations; fields {batch.names}")
        for cb in list(self._callbacks):
            cb(batch, self)
        return batch

    def _show_error(self, message: str) -> None:
        self.error = message
        self.message.value = _error_html(message)

    def _on_upload(self, change: dict) -> None:
        files = change["new"]
        if not files:
            return
        f = files[0] if isinstance(files, (tuple, list)) else next(iter(files.values()))
        self.load_csv(f["content"], f.get("name", "upload.csv"))
