"""Subjects' data as padded tensors with a mask.

:class:`SubjectBatch` is the single entry point for data.  It is built either
from pyEM-style per-subject lists (``all_data[i] = [choices, rewards, ...]``)
or from a long pandas DataFrame, validated once, padded to a common trial
shape and moved to one device and dtype.  Everything downstream (models, the
E-step, evidence) trusts its shapes and mask.

Shapes
------
``S`` subjects, a *trial shape* shared by all fields of a subject (``(T,)``
or ``(B, T)`` for blocks of trials) and optional trailing *feature* dims that
are the same for every subject (e.g. ``(T, K)`` regressors).  After padding:

- each field: ``(S, *trial_shape, *feature_shape)``
- ``mask``: ``(S, *trial_shape)``, ``True`` where a real observation sits.
"""
from __future__ import annotations

import csv
import io
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

__all__ = ["SubjectBatch", "read_table", "parse_columns"]


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, pd.Series):
        return value.to_numpy()
    if isinstance(value, np.ndarray):
        return value
    # a Python sequence: keep text as objects so a missing value (NaN, None) is not turned into 'nan'
    obj = np.asarray(value, dtype=object)
    if any(isinstance(v, str) for v in obj.ravel()):
        return obj
    return np.asarray(value)


#: Text that usually marks a missing value in a data file.
_MISSING_MARKERS = (".", "", "na", "n/a", "nan", "null", "none", "-", "?", "missing")
#: Column names taken for a trial counter when ``trial=`` is not given.
_TRIAL_NAMES = ("trial", "trials", "trial_num", "trialnum", "trial_number", "trial_no", "trial_nr", "trial_index",
                "trial_idx", "trial_id", "t")


def parse_columns(text: str) -> list:
    """``"a,[b,c],d"`` -> ``["a", ["b", "c"], "d"]``: bracketed columns form one field (``columns=`` of
    :meth:`SubjectBatch.from_dataframe`; the command line's ``--columns``, the dashboard's Data tab)."""
    out, group = [], None
    for part in (p.strip() for p in text.split(",")):
        if part.startswith("["):
            group, part = [], part[1:].strip()
        end = part.endswith("]")
        name = part[:-1].strip() if end else part
        if group is None:
            out.append(name)
        else:
            group.append(name)
            if end:
                out.append(group)
                group = None
    if group is not None:
        raise ValueError(f"unclosed '[' in the columns {text!r}")
    return out


def read_table(source: str | os.PathLike | bytes, sep: str | None = None,
               na_values: Sequence[str] = ()) -> pd.DataFrame:
    """Read a long data file (CSV, TSV, ...) into a DataFrame.

    Parameters
    ----------
    source : path or bytes
        A file, or its content (e.g. an upload).
    sep : str, optional
        Column separator (``"\\t"`` or ``"tab"`` for tabs).  Default: tabs for
        ``.tsv``/``.tab`` files, otherwise sniffed among comma, tab,
        semicolon and ``|`` from the start of the file.
    na_values : sequence of str
        Extra text that marks a missing value (e.g. ``"."``); pandas'
        defaults (empty, ``NA``, ``NaN``, ...) always count.

    Raises
    ------
    ValueError
        The file reads as fewer than two columns (a wrong separator).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        text = bytes(source).decode("utf-8-sig")
        name, sample = "the data", text[:65536]
    else:
        text, name = None, os.fspath(source)
        with open(name, newline="", encoding="utf-8-sig") as fh:
            sample = fh.read(65536)
    if sep in ("\\t", "tab", "TAB"):
        sep = "\t"
    if sep is None:
        if text is None and name.lower().endswith((".tsv", ".tab")):
            sep = "\t"
        else:
            try:
                sep = csv.Sniffer().sniff(sample.split("\n", 1)[0] + "\n", delimiters=",\t;|").delimiter
            except csv.Error:
                sep = ","
    df = pd.read_csv(io.StringIO(text) if text is not None else name, sep=sep, na_values=list(na_values) or None)
    if df.shape[1] < 2:
        raise ValueError(f"{name} reads as {df.shape[1]} column with the separator {sep!r}; give the separator "
                         "(sep=..., torchem fit --sep)")
    return df


def _parse(values: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """Numbers of ``values``: ``(numbers, text, integer)``.

    ``numbers`` is a float array of ``values``' shape, NaN where a value is
    missing or is text that is not a number (never a view that may be written
    to); ``text`` marks the latter (the scalar ``False`` for a numeric array);
    ``integer`` says the values came as integers (or booleans).  Text that
    reads as a number (``'-1'``, ``' 2.5'``) is that number.
    """
    kind = values.dtype.kind
    if kind in "iubf":
        return np.asarray(values, dtype=np.float64), np.False_, kind != "f"
    if kind not in "OUS":
        raise ValueError(f"{what} has unsupported dtype {values.dtype}")
    flat = pd.Series(values.ravel(), dtype=object)
    missing = flat.isna().to_numpy()
    numbers = pd.to_numeric(flat, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    text = np.isnan(numbers) & ~missing
    present = ~missing & ~text
    integer = bool(present.any()) and all(isinstance(v, (bool, int, np.integer, np.bool_))
                                          for v in flat[present])
    return numbers.reshape(values.shape), text.reshape(values.shape), integer


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value (for messages and subject ids)."""
    return value.item() if isinstance(value, np.generic) else value


def _missing_hint(value: Any) -> str:
    if isinstance(value, str) and value.strip().lower() in _MISSING_MARKERS:
        return (f"; if {value!r} marks a missing value, read the file with na_values=[{value!r}] "
                "(pandas.read_csv; torchem fit --na) and remove or skip those trials")
    return ""


def _resolve_fields(spec: Sequence, names: list[str], what: str) -> list[int]:
    """Field positions of ``spec`` (positions or field names)."""
    out = []
    for f in spec:
        if isinstance(f, (int, np.integer)) and not isinstance(f, bool):
            if not 0 <= int(f) < len(names):
                raise ValueError(f"{what}: field position {f} out of range for fields {names}")
            out.append(int(f))
        elif f in names:
            out.append(names.index(f))
        else:
            raise ValueError(f"{what}: unknown field {f!r}; the fields are {names}")
    return out


@dataclass
class SubjectBatch:
    """Padded, masked, validated data of many subjects.

    Build it with :meth:`from_lists` or :meth:`from_dataframe`; the
    constructor takes already padded tensors and does not validate.

    Coding rules (checked once, here):

    - a field is numbers unless it is declared ``categorical``; text in a
      numeric field is an error that names the subject, the row and the value
      (text that reads as a number, such as ``'-1'``, is that number);
    - a ``categorical`` field may hold text labels, coded ``0, 1, ...`` in
      sorted label order (fields grouped in one entry share one coding), or
      numbers, used as given (``first_option=1`` shifts codes ``1, 2, ...``
      to ``0, 1, ...``);
    - a missing value (NaN, None, an empty cell) is an error, unless
      ``missing="skip"`` and it sits in a ``responses`` field: the trial is
      then masked (skipped by the likelihood) in its place in the sequence.

    Attributes
    ----------
    fields : dict[str, Tensor]
        Data fields by name, each ``(S, *trial_shape, *feature_shape)``.
        Integer (and label-coded) fields are ``torch.long``; real fields use
        the batch's floating dtype.
    mask : Tensor
        ``(S, *trial_shape)`` boolean, ``True`` on real observations.
    subject_ids : list
        One identifier per subject, in batch order.
    categories : dict[str, list]
        For fields given as text labels (e.g. choices ``'A'``/``'B'``), the
        labels in code order: code ``k`` stands for ``categories[name][k]``.
    rows : Tensor or None
        ``(S, *trial_shape)`` long, CPU: the 0-based row of the source table
        of each trial (``-1`` on padding); ``None`` for list input.  Error
        messages use it to name rows.
    categorical : list of str
        Fields declared categorical when the batch was built.
    warnings : list of str
        What was doubtful about the data (e.g. row order taken on trust).
    """

    fields: dict[str, torch.Tensor]
    mask: torch.Tensor
    subject_ids: list = field(default_factory=list)
    categories: dict[str, list] = field(default_factory=dict)
    rows: torch.Tensor | None = None
    categorical: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ views
    @property
    def names(self) -> list[str]:
        """Field names in the order a model receives them."""
        return list(self.fields)

    @property
    def data(self) -> tuple[torch.Tensor, ...]:
        """Field tensors in order, ready for ``fit_func(params, *batch.data, mask=batch.mask)``."""
        return tuple(self.fields.values())

    @property
    def n_subjects(self) -> int:
        return int(self.mask.shape[0])

    def __len__(self) -> int:
        return self.n_subjects

    @property
    def trial_shape(self) -> tuple[int, ...]:
        """Padded trial shape, ``mask.shape[1:]``."""
        return tuple(self.mask.shape[1:])

    @property
    def n_obs(self) -> torch.Tensor:
        """``(S,)`` number of real observations (unmasked trials) per subject."""
        return self.mask.reshape(self.n_subjects, -1).sum(1)

    @property
    def device(self) -> torch.device:
        return self.mask.device

    def locate(self, subject: int, position: Sequence[int]) -> str:
        """Where trial ``position`` (an index into the trial shape) of subject ``subject`` (batch order) came from.

        ``"data row 17 (line 18 of a CSV file with a header line)"`` for table
        input, ``"index (2, 5)"`` for list input.
        """
        return _where(None if self.rows is None else self.rows[subject].numpy(), tuple(int(p) for p in position))

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape[1:])}" for k, v in self.fields.items())
        n = self.n_obs
        return (
            f"SubjectBatch({self.n_subjects} subjects, trials per subject "
            f"{int(n.min())}-{int(n.max())}, fields {{{shapes}}}, device={self.device})"
        )

    # ------------------------------------------------------------- transforms
    def _like(self, fields: dict, mask: torch.Tensor, ids: list, rows: torch.Tensor | None) -> "SubjectBatch":
        return SubjectBatch(fields, mask, ids, dict(self.categories), rows, list(self.categorical),
                            list(self.warnings))

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "SubjectBatch":
        """Move to ``device`` and cast real-valued fields to ``dtype``."""
        out = {}
        for name, value in self.fields.items():
            cast = dtype if (dtype is not None and value.is_floating_point()) else None
            out[name] = value.to(device=device, dtype=cast)
        return self._like(out, self.mask.to(device), list(self.subject_ids), self.rows)

    def pin_memory(self) -> "SubjectBatch":
        """A copy on the CPU in pinned (page-locked) memory, from which copies to a CUDA device run asynchronously.

        Pinning needs CUDA: without it the batch is only moved to the CPU.
        """
        host = self.to("cpu")
        if not torch.cuda.is_available():
            return host
        return host._like({k: v.pin_memory() for k, v in host.fields.items()}, host.mask.pin_memory(),
                          list(host.subject_ids), host.rows)

    def rows_to(self, subjects: torch.Tensor, device: str | torch.device) -> tuple[tuple[torch.Tensor, ...],
                                                                                   torch.Tensor]:
        """Data fields and mask of ``subjects`` ``(n,)`` copied to ``device`` (``non_blocking``).

        A consecutive run of subjects (a chunk) is sliced, a view that keeps
        pinned memory pinned, so its copy to a CUDA device is asynchronous;
        other index sets are gathered first.  Returns ``(data, mask)`` with
        ``n`` subjects first, like :attr:`data` and :attr:`mask`.
        """
        idx = subjects.to(self.device)
        n = idx.numel()
        lo = int(idx[0]) if n else 0
        if n and bool((idx == torch.arange(lo, lo + n, device=idx.device)).all()):
            def take(t: torch.Tensor) -> torch.Tensor:
                return t[lo:lo + n]
        else:
            def take(t: torch.Tensor) -> torch.Tensor:
                return t[idx]
        data = tuple(take(d).to(device, non_blocking=True) for d in self.data)
        return data, take(self.mask).to(device, non_blocking=True)

    def index(self, idx: torch.Tensor | Sequence[int]) -> "SubjectBatch":
        """Subjects ``idx`` (repeats allowed) as a new batch sharing the labels."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.device)
        ids = [self.subject_ids[i] for i in idx.tolist()] if self.subject_ids else []
        rows = None if self.rows is None else self.rows[idx.cpu()]
        return self._like({k: v[idx] for k, v in self.fields.items()}, self.mask[idx], ids, rows)

    # ------------------------------------------------------------ builders
    @classmethod
    def from_lists(
        cls,
        all_data: Sequence[Sequence[Any]],
        names: Sequence[str] | None = None,
        subject_ids: Sequence[Any] | None = None,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device | None = None,
        *,
        categorical: Sequence[int | str | Sequence[int | str]] = (),
        responses: Sequence[int | str] = (),
        missing: str = "error",
        first_option: int = 0,
    ) -> "SubjectBatch":
        """Build from pyEM-style per-subject lists.

        Parameters
        ----------
        all_data : sequence of sequences
            ``all_data[i]`` holds subject ``i``'s fields, e.g. ``[choices,
            rewards]``; each a numpy array, tensor or list.  All fields of a
            subject share a leading *trial shape* (that of its
            lowest-dimensional field, e.g. ``(nblocks, ntrials)``); extra
            trailing dims are features and must match across subjects.
        names : sequence of str, optional
            Field names; default ``input0, input1, ...``.
        subject_ids : sequence, optional
            Subject identifiers; default ``0..S-1``.
        dtype, device
            Floating dtype of real fields and the target device.
        categorical : sequence, optional
            Fields (names or positions) that hold option codes and may be
            given as text labels, coded in sorted label order.  An entry that
            is itself a sequence of fields gives them one shared coding
            (e.g. a choice and the options offered).  Text in any other field
            is an error.
        responses : sequence, optional
            Fields the subject produced (e.g. choices).  With
            ``missing="skip"``, a missing value in one of them marks a missed
            trial, which is masked in place.
        missing : {"error", "skip"}
            What a missing response does (see ``responses``).
        first_option : int
            Code of the first option in numeric ``categorical`` fields: ``1``
            for data coded ``1, 2, ...`` (MATLAB, hBayesDM), which are then
            shifted to ``0, 1, ...``.

        Raises
        ------
        ValueError
            Empty data, a subject with a different number of fields, an
            empty subject, text in a numeric field, NaN/inf values, or shapes
            that disagree; the message names the subject, the field, the
            position and the value.
        """
        if isinstance(all_data, pd.DataFrame):
            raise ValueError("got a DataFrame: use SubjectBatch.from_dataframe(df, subject=..., columns=...)")
        if len(all_data) == 0:
            raise ValueError("all_data is empty: no subjects to fit")
        subject_ids = list(range(len(all_data))) if subject_ids is None else list(subject_ids)
        if len(subject_ids) != len(all_data):
            raise ValueError(f"{len(subject_ids)} subject ids for {len(all_data)} subjects")
        first = all_data[0]
        if isinstance(first, (np.ndarray, torch.Tensor)) and not isinstance(first, (list, tuple)):
            first = [first]
        n_fields = len(first)
        names = [f"input{j}" for j in range(n_fields)] if names is None else list(names)
        if len(names) != n_fields:
            raise ValueError(
                f"subject {subject_ids[0]!r}: {n_fields} data fields but {len(names)} names {names}"
            )
        per_subject = []
        for sid, subj in zip(subject_ids, all_data):
            if isinstance(subj, (np.ndarray, torch.Tensor)):
                subj = [subj]
            if len(subj) != n_fields:
                raise ValueError(
                    f"subject {sid!r}: {len(subj)} data fields, expected {n_fields} ({', '.join(names)})"
                )
            per_subject.append([_to_numpy(v) for v in subj])
        return cls._build(per_subject, None, None, None, names, subject_ids, dtype, device,
                          categorical, responses, missing, first_option, [])

    @classmethod
    def from_dataframe(
        cls,
        df: pd.DataFrame,
        subject: str = "subject",
        columns: Sequence[str] | None = None,
        block: str | None = None,
        trial: str | bool | None = None,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device | None = None,
        *,
        categorical: Sequence[int | str | Sequence[int | str]] = (),
        responses: Sequence[int | str] = (),
        missing: str = "error",
        mask: str | None = None,
        first_option: int = 0,
    ) -> "SubjectBatch":
        """Build from a long DataFrame, one row per trial.

        Parameters
        ----------
        df : DataFrame
            Long-format data.
        subject : str
            Column identifying the subject.  Subjects appear in sorted order.
        columns : sequence of str or of lists of str
            Data columns, in the order the model takes them (e.g.
            ``["choice", "reward"]``).  An entry that is itself a list of
            columns becomes one field with a trailing axis, the columns
            stacked in that order (e.g. the predictors of a regression:
            ``[["x0", "x1", "x2"], "y"]`` gives ``X`` ``(S, T, 3)`` and ``Y``).
        block : str, optional
            Block column.  With it, each field is ``(S, B, T)``: blocks of a
            subject in sorted order, trials within a block padded to the
            longest block; without it, ``(S, T)``.
        trial : str, False or None
            Trial-order column; rows are sorted by ``(block, trial)``.
            ``None`` (default): a column named like a trial counter
            (``trial``, ``trial_num``, ``trial_index``, ``t``, ...) is used
            if the rows are in its order within every subject and block, and
            the rows are refused if they are not; without such a column the
            row order is used, with a warning.  ``False``: the row order is
            the trial order (no check, no warning).
        dtype, device
            Floating dtype of real fields and the target device.
        categorical, responses, missing, first_option
            As in :meth:`from_lists`; fields are named by their entry in
            ``columns`` (a column name, or ``"[x0, x1]"`` for a group) or
            given by position.
        mask : str, optional
            Column that is true (``1``) on trials to use and false (``0``) on
            trials to skip (missed or timed out); skipped trials keep their
            place in the sequence and may hold anything, NaN included.

        Raises
        ------
        ValueError
            Unknown columns, text in a numeric column, NaN/inf in a used
            column, duplicated ``(block, trial)`` rows, rows out of the order
            of their trial counter, or an empty data frame; the message names
            the subject, the column, the row and the value.
        """
        if not isinstance(df, pd.DataFrame):
            raise ValueError(f"expected a pandas DataFrame, got {type(df).__name__}")
        if columns is None or len(columns) == 0:
            raise ValueError("columns must name the data columns, e.g. columns=['choice', 'reward']")
        if isinstance(columns, str):
            columns = [c.strip() for c in columns.split(",")]
        columns = [c if isinstance(c, str) else list(c) for c in columns]
        used = [c for entry in columns for c in ([entry] if isinstance(entry, str) else entry)]
        wanted = [subject, *used] + [c for c in (block, trial, mask) if isinstance(c, str)]
        unknown = [c for c in wanted if c not in df.columns]
        if unknown:
            raise ValueError(f"unknown column(s) {unknown}; the data frame has {list(df.columns)}")
        if len(df) == 0:
            raise ValueError("the data frame has no rows")
        df = df.reset_index(drop=True)  # the index is now the 0-based row
        for col in [subject] + [c for c in (block, trial) if isinstance(c, str)]:
            bad = df[col].isna().to_numpy()
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise ValueError(f"column '{col}' is missing at {_where(None, None, row)}")
        notes: list[str] = []
        if trial is None:
            trial = _trial_counter(df, subject, block, {subject, block, mask, *used}, notes)
        elif trial is False:
            trial = None
        order = [c for c in (block, trial) if c is not None]
        per_subject, masks, rows, keep, ids = [], [], [], [], []
        for sid, sub in df.groupby(subject, sort=True):
            sid = _plain(sid)
            if order:
                sub = sub.sort_values(order, kind="stable")
            if trial is not None:
                dup = sub.duplicated(order)
                if dup.any():
                    where = sub.loc[dup, order].iloc[0].to_dict()
                    raise ValueError(f"subject {sid!r}: duplicated rows for {where} "
                                     f"({_where(None, None, int(sub.index[dup.to_numpy()][0]))})")
            groups = [g for _, g in sub.groupby(block, sort=True)] if block is not None else [sub]
            t_max = max(len(g) for g in groups)
            tshape = (len(groups), t_max) if block is not None else (t_max,)
            m = np.zeros(tshape, dtype=bool)
            r = np.full(tshape, -1, dtype=np.int64)
            for b, g in enumerate(groups):
                at = (b, slice(0, len(g))) if block is not None else slice(0, len(g))
                m[at] = True
                r[at] = g.index.to_numpy()
            fields = []
            for c in [*columns] + ([mask] if mask is not None else []):
                values = sub[c].to_numpy()
                numeric = values.dtype.kind in "iubf"
                arr = np.full((*tshape, *values.shape[1:]), 0 if numeric else None,
                              dtype=values.dtype if numeric else object)
                for b, g in enumerate(groups):
                    arr[(b, slice(0, len(g))) if block is not None else slice(0, len(g))] = g[c].to_numpy()
                fields.append(arr)
            if mask is not None:
                keep.append(_mask_column(fields.pop(), m, r, mask, sid))
            per_subject.append(fields)
            masks.append(m)
            rows.append(r)
            ids.append(sid)
        names = [c if isinstance(c, str) else "[" + ", ".join(c) + "]" for c in columns]
        return cls._build(per_subject, masks, rows, keep if mask is not None else None, names, ids, dtype, device,
                          categorical, responses, missing, first_option, notes)

    # ------------------------------------------------------------ internals
    @classmethod
    def _build(
        cls,
        per_subject: list[list[np.ndarray]],
        masks: list[np.ndarray] | None,
        rows: list[np.ndarray] | None,
        keep: list[np.ndarray] | None,
        names: list[str],
        ids: list,
        dtype: torch.dtype,
        device: str | torch.device | None,
        categorical: Sequence,
        responses: Sequence,
        missing: str,
        first_option: int,
        notes: list[str],
    ) -> "SubjectBatch":
        if missing not in ("error", "skip"):
            raise ValueError(f"missing must be 'error' or 'skip', got {missing!r}")
        groups = [_resolve_fields([g] if isinstance(g, (str, int, np.integer)) else list(g), names, "categorical")
                  for g in categorical]
        cat_fields = {j for g in groups for j in g}
        resp = _resolve_fields(list(responses), names, "responses")
        if missing == "skip" and not resp:
            raise ValueError("missing='skip' needs the response fields whose missing value marks a missed trial "
                             "(responses=[...]); the model declares none")
        n_fields = len(names)
        # 1. trial shape: the shape of the lowest-dimensional field of the first subject
        ndims = [a.ndim for a in per_subject[0]]
        if min(ndims) == 0:
            j = ndims.index(0)
            raise ValueError(f"subject {ids[0]!r}: field '{names[j]}' is a scalar; every field needs a trial axis")
        k = min(ndims)
        feature_shapes = [per_subject[0][j].shape[k:] for j in range(n_fields)]
        real = []
        for i, (sid, fields) in enumerate(zip(ids, per_subject)):
            tshape = None
            for j, arr in enumerate(fields):
                if arr.ndim != ndims[j]:
                    raise ValueError(
                        f"subject {sid!r}: field '{names[j]}' has {arr.ndim} dims {arr.shape}, "
                        f"expected {ndims[j]} like subject {ids[0]!r}"
                    )
                if arr.shape[k:] != feature_shapes[j]:
                    raise ValueError(
                        f"subject {sid!r}: field '{names[j]}' has feature shape {arr.shape[k:]}, "
                        f"expected {feature_shapes[j]} like subject {ids[0]!r}"
                    )
                if tshape is None:
                    tshape = arr.shape[:k]
                elif arr.shape[:k] != tshape:
                    raise ValueError(
                        f"subject {sid!r}: field '{names[j]}' has trial shape {arr.shape[:k]} but "
                        f"'{names[0]}' has {tshape}; fields of one subject must have matching lengths"
                    )
            m = np.ones(tshape, dtype=bool) if masks is None else masks[i]
            if not m.any():
                raise ValueError(f"subject {sid!r}: no trials (empty subject)")
            real.append(m)
        where = [(lambda pos, r=(None if rows is None else rows[i]): _where(r, pos)) for i in range(len(ids))]
        parsed = [[_parse(a, f"subject {sid!r}: field '{names[j]}'") for j, a in enumerate(fields)]
                  for sid, fields in zip(ids, per_subject)]
        # 2. trials to use: real, not masked by the mask column, and (missing="skip") with every response given
        use = []
        for i, sid in enumerate(ids):
            skip = np.zeros_like(real[i]) if keep is None else ~keep[i]
            if missing == "skip":
                for j in resp:
                    num, text, _ = parsed[i][j]
                    gone = np.isnan(num) & ~text
                    skip |= gone.reshape(real[i].shape + (-1,)).any(-1) if gone.ndim > real[i].ndim else gone
            u = real[i] & ~skip
            if not u.any():
                raise ValueError(f"subject {sid!r}: every trial is missing or masked; no trials to fit")
            use.append(u)

        every = [bool(u.all()) for u in use]

        def cells(i: int, j: int) -> np.ndarray:
            """Used trials of subject ``i`` broadcast over field ``j``'s feature axes (``True`` when all are)."""
            if every[i]:
                return np.True_
            a = per_subject[i][j]
            return np.broadcast_to(use[i].reshape(use[i].shape + (1,) * (a.ndim - use[i].ndim)), a.shape)

        def first(i: int, j: int, bad: np.ndarray) -> tuple[tuple, Any]:
            pos = tuple(int(p) for p in np.argwhere(bad)[0])
            return pos, _plain(per_subject[i][j][pos])

        # 3. text: an error in a numeric field; labels coded in sorted order in a categorical group
        numbers = [[num for num, _, _ in subj] for subj in parsed]
        integer = [all(parsed[i][j][2] for i in range(len(ids))) for j in range(n_fields)]
        labelled: dict[int, tuple[int, tuple, Any]] = {}
        for j in range(n_fields):
            for i, sid in enumerate(ids):
                text = parsed[i][j][1] & cells(i, j)
                if text.any():
                    pos, value = first(i, j, text)
                    if j not in cat_fields:
                        raise ValueError(
                            f"subject {sid!r}: field '{names[j]}' must hold numbers but has the text {value!r} "
                            f"at {where[i](pos)}{_missing_hint(value)}; only fields the model declares "
                            "categorical (option codes such as choices) may hold text labels")
                    labelled.setdefault(j, (i, pos, value))
                    break
        categories: dict[str, list] = {}
        for group in groups:
            if not any(j in labelled for j in group):
                for j in group:
                    for i in range(len(ids)):
                        numbers[i][j] = numbers[i][j] - first_option
                continue
            i0, pos0, label0 = labelled[next(j for j in group if j in labelled)]
            labels: set = set()
            for j in group:
                for i, sid in enumerate(ids):
                    num, text, _ = parsed[i][j]
                    num_cells = cells(i, j) & ~np.isnan(num)
                    if num_cells.any():
                        pos, value = first(i, j, num_cells)
                        raise ValueError(
                            f"subject {sid!r}: field '{names[j]}' mixes numbers and text labels: {value!r} at "
                            f"{where[i](pos)}, but {label0!r} at {where[i0](pos0)} of subject {ids[i0]!r}; "
                            f"give every option as a label or every option as a number{_missing_hint(label0)}")
                    given = cells(i, j) & text
                    labels.update(str(v) for v in per_subject[i][j][given].ravel().tolist())
            vocab = sorted(labels)
            lookup = {lab: float(c) for c, lab in enumerate(vocab)}
            for j in group:
                categories[names[j]] = vocab
                for i in range(len(ids)):
                    given = cells(i, j) & parsed[i][j][1]
                    coded = np.full(per_subject[i][j].shape, np.nan)
                    coded[given] = [lookup[str(v)] for v in per_subject[i][j][given].ravel().tolist()]
                    numbers[i][j] = coded
        # 4. missing and non-finite values on used trials; skipped trials and padding hold 0
        for i, sid in enumerate(ids):
            for j in range(n_fields):
                u = cells(i, j)
                a = numbers[i][j]
                bad = ~np.isfinite(a) & u
                if bad.any():
                    pos, value = first(i, j, bad)
                    hint = "; remove or fill such trials"
                    if j in resp and missing == "error":
                        hint = ("; if it marks a missed trial, pass missing='skip' (torchem fit --missing skip) "
                                "to skip it in the likelihood and keep the trial sequence, or remove the trial")
                    what = ("a missing value (NaN or empty)" if np.isnan(a[pos]) else f"a non-finite value {value!r}")
                    raise ValueError(f"subject {sid!r}: field '{names[j]}' has {what} at {where[i](pos)}{hint}")
                numbers[i][j] = a if every[i] else np.where(u, a, 0.0)
        for j in cat_fields:  # option codes are integers (fractional codes are left for the model's check to refuse)
            integer[j] = all(bool(np.all(numbers[i][j] == np.round(numbers[i][j]))) for i in range(len(ids)))
        t_max = tuple(int(x) for x in np.max([m.shape for m in real], axis=0))
        S = len(per_subject)
        mask = np.zeros((S, *t_max), dtype=bool)
        row_out = np.full((S, *t_max), -1, dtype=np.int64)
        for i in range(S):
            region = (i, *(slice(0, n) for n in real[i].shape))
            mask[region] = use[i]
            if rows is not None:
                row_out[region] = rows[i]
        out: dict[str, torch.Tensor] = {}
        for j, name in enumerate(names):
            np_dtype = np.int64 if integer[j] else np.float64
            padded = np.zeros((S, *t_max, *feature_shapes[j]), dtype=np_dtype)
            for i in range(S):
                a = numbers[i][j]
                padded[(i, *(slice(0, n) for n in a.shape))] = a
            out[name] = torch.from_numpy(padded).to(device=device, dtype=None if integer[j] else dtype)
        for note in notes:
            warnings.warn(note, stacklevel=3)
        return cls(out, torch.from_numpy(mask).to(device), list(ids), categories,
                   None if rows is None else torch.from_numpy(row_out),
                   [names[j] for g in groups for j in g], list(notes))


def _where(rows: np.ndarray | None, position: tuple | None, row: int | None = None) -> str:
    """``"data row R (line R+1 of a CSV file with a header line)"`` (1-based) or ``"index (b, t)"``."""
    if row is None and rows is not None:
        row = int(rows[position[: rows.ndim]])
    if row is None or row < 0:
        return f"index {position}"
    return f"data row {row + 1} (line {row + 2} of a CSV file with a header line)"


def _mask_column(values: np.ndarray, real: np.ndarray, rows: np.ndarray, name: str, sid: Any) -> np.ndarray:
    """The ``mask=`` column of one subject as bool (``True``: use the trial); anything but 0/1 is an error."""
    num, text, _ = _parse(values, f"subject {sid!r}: mask column '{name}'")
    bad = real & (text | np.isnan(num) | ((num != 0) & (num != 1)))
    if bad.any():
        pos = tuple(int(p) for p in np.argwhere(bad)[0])
        raise ValueError(f"subject {sid!r}: mask column '{name}' must be 1/True (use the trial) or 0/False "
                         f"(skip it), got {_plain(values[pos])!r} at {_where(rows, pos)}")
    return num == 1


def _trial_counter(df: pd.DataFrame, subject: str, block: str | None, taken: set, notes: list[str]) -> str | None:
    """The column to order trials by when ``trial=`` is not given, or ``None`` (row order, with a note).

    A column named like a trial counter is used when it increases within
    every subject (and block) in row order; rows out of its order are refused.
    """
    for col in df.columns:
        if col in taken or not isinstance(col, str) or col.strip().lower().replace(" ", "_") not in _TRIAL_NAMES:
            continue
        counter = pd.to_numeric(df[col], errors="coerce")
        if counter.isna().any():
            continue
        keys = [subject] + ([block] if block is not None else [])
        step = counter.groupby([df[c] for c in keys], sort=False).diff()
        bad = (step <= 0).to_numpy()
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            prev = counter.iloc[r] - step.iloc[r]
            unit = f"subject {_plain(df[subject].iloc[r])!r}" + (f", block {_plain(df[block].iloc[r])!r}" if block else "")
            raise ValueError(
                f"{unit}: the rows are not in the order of column '{col}' ({col} {prev:g} is followed by "
                f"{counter.iloc[r]:g} at {_where(None, None, r)}); pass trial={col!r} to sort the rows by it, "
                "or trial=False if the row order is the trial order (command line: --trial / --row-order)")
        return col
    unit = "subject and block" if block is not None else "subject"
    notes.append(f"no trial column given or found: the rows of each {unit} are taken in the order of the table; "
                 "pass trial='<column>' to sort them by a trial counter, or trial=False to confirm the row order")
    return None
