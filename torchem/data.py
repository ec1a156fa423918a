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

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

__all__ = ["SubjectBatch"]


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


def _is_text(arr: np.ndarray) -> bool:
    if arr.dtype.kind in "US":
        return True
    if arr.dtype.kind == "O":
        return any(isinstance(v, str) for v in arr.ravel())
    return False


@dataclass
class SubjectBatch:
    """Padded, masked, validated data of many subjects.

    Build it with :meth:`from_lists` or :meth:`from_dataframe`; the
    constructor takes already padded tensors and does not validate.

    Attributes
    ----------
    fields : dict[str, Tensor]
        Data fields by name, each ``(S, *trial_shape, *feature_shape)``.
        Integer (and text) fields are ``torch.long``; real fields use the
        batch's floating dtype.
    mask : Tensor
        ``(S, *trial_shape)`` boolean, ``True`` on real observations.
    subject_ids : list
        One identifier per subject, in batch order.
    categories : dict[str, list]
        For fields given as text (e.g. choices ``'A'``/``'B'``), the labels in
        code order: code ``k`` stands for ``categories[name][k]``.
    """

    fields: dict[str, torch.Tensor]
    mask: torch.Tensor
    subject_ids: list = field(default_factory=list)
    categories: dict[str, list] = field(default_factory=dict)

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

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape[1:])}" for k, v in self.fields.items())
        n = self.n_obs
        return (
            f"SubjectBatch({self.n_subjects} subjects, trials per subject "
            f"{int(n.min())}-{int(n.max())}, fields {{{shapes}}}, device={self.device})"
        )

    # ------------------------------------------------------------- transforms
    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "SubjectBatch":
        """Move to ``device`` and cast real-valued fields to ``dtype``."""
        out = {}
        for name, value in self.fields.items():
            cast = dtype if (dtype is not None and value.is_floating_point()) else None
            out[name] = value.to(device=device, dtype=cast)
        return SubjectBatch(out, self.mask.to(device), list(self.subject_ids), dict(self.categories))

    def index(self, idx: torch.Tensor | Sequence[int]) -> "SubjectBatch":
        """Subjects ``idx`` (repeats allowed) as a new batch sharing the labels."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.device)
        ids = [self.subject_ids[i] for i in idx.tolist()] if self.subject_ids else []
        return SubjectBatch({k: v[idx] for k, v in self.fields.items()}, self.mask[idx], ids, dict(self.categories))

    # ------------------------------------------------------------ builders
    @classmethod
    def from_lists(
        cls,
        all_data: Sequence[Sequence[Any]],
        names: Sequence[str] | None = None,
        subject_ids: Sequence[Any] | None = None,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device | None = None,
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
            Text fields (``'A'``/``'B'``) are coded as integers in sorted
            label order.
        names : sequence of str, optional
            Field names; default ``input0, input1, ...``.
        subject_ids : sequence, optional
            Subject identifiers; default ``0..S-1``.
        dtype, device
            Floating dtype of real fields and the target device.

        Raises
        ------
        ValueError
            Empty data, a subject with a different number of fields, an
            empty subject, NaN/inf values, or shapes that disagree; the
            message names the subject and the field.
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
        return cls._build(per_subject, None, names, subject_ids, dtype, device)

    @classmethod
    def from_dataframe(
        cls,
        df: pd.DataFrame,
        subject: str = "subject",
        columns: Sequence[str] | None = None,
        block: str | None = None,
        trial: str | None = None,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device | None = None,
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
        trial : str, optional
            Trial-order column; rows are sorted by ``(block, trial)``.
            Without it the row order within each block is kept.

        Raises
        ------
        ValueError
            Unknown columns, NaN/inf in a used column, duplicated
            ``(block, trial)`` rows, or an empty data frame; the message names
            the subject and the column.
        """
        if not isinstance(df, pd.DataFrame):
            raise ValueError(f"expected a pandas DataFrame, got {type(df).__name__}")
        if columns is None or len(columns) == 0:
            raise ValueError("columns must name the data columns, e.g. columns=['choice', 'reward']")
        if isinstance(columns, str):
            columns = [c.strip() for c in columns.split(",")]
        columns = [c if isinstance(c, str) else list(c) for c in columns]
        used = [c for entry in columns for c in ([entry] if isinstance(entry, str) else entry)]
        wanted = [subject, *used] + [c for c in (block, trial) if c is not None]
        unknown = [c for c in wanted if c not in df.columns]
        if unknown:
            raise ValueError(f"unknown column(s) {unknown}; the data frame has {list(df.columns)}")
        if len(df) == 0:
            raise ValueError("the data frame has no rows")
        for col in [subject] + [c for c in (block, trial) if c is not None]:
            bad = df[col].isna()
            if bad.any():
                row = df.index[bad.to_numpy()][0]
                raise ValueError(f"column '{col}' is missing at row {row!r}")
        order = [c for c in (block, trial) if c is not None]
        # without a trial column, rows keep their order and cannot be duplicates of each other
        keys = [c for c in (block, trial) if c is not None] if trial is not None else []
        per_subject, masks, ids = [], [], []
        for sid, sub in df.groupby(subject, sort=True):
            if order:
                sub = sub.sort_values(order, kind="stable")
            if keys:
                dup = sub.duplicated(keys)
                if dup.any():
                    where = sub.loc[dup, keys].iloc[0].to_dict()
                    raise ValueError(f"subject {sid!r}: duplicated rows for {where}")
            if block is None:
                fields = [sub[c].to_numpy() for c in columns]
                mask = np.ones(len(sub), dtype=bool)
            else:
                groups = [g for _, g in sub.groupby(block, sort=True)]
                t_max = max(len(g) for g in groups)
                mask = np.zeros((len(groups), t_max), dtype=bool)
                fields = []
                for c in columns:
                    values = sub[c].to_numpy()
                    arr = np.zeros((len(groups), t_max, *values.shape[1:]),
                                   dtype=values.dtype if values.dtype.kind != "O" else object)
                    if arr.dtype.kind == "O":
                        arr[:] = values[0]  # padding placeholder of a valid label
                    for b, g in enumerate(groups):
                        arr[b, : len(g)] = g[c].to_numpy()
                        mask[b, : len(g)] = True
                    fields.append(arr)
            per_subject.append(fields)
            masks.append(mask)
            ids.append(sid)
        names = [c if isinstance(c, str) else "[" + ", ".join(c) + "]" for c in columns]
        return cls._build(per_subject, masks, names, ids, dtype, device)

    # ------------------------------------------------------------ internals
    @classmethod
    def _build(
        cls,
        per_subject: list[list[np.ndarray]],
        masks: list[np.ndarray] | None,
        names: list[str],
        ids: list,
        dtype: torch.dtype,
        device: str | torch.device | None,
    ) -> "SubjectBatch":
        n_fields = len(names)
        # 1. trial shape: the shape of the lowest-dimensional field of the first subject
        ndims = [a.ndim for a in per_subject[0]]
        if min(ndims) == 0:
            j = ndims.index(0)
            raise ValueError(f"subject {ids[0]!r}: field '{names[j]}' is a scalar; every field needs a trial axis")
        k = min(ndims)
        feature_shapes = [per_subject[0][j].shape[k:] for j in range(n_fields)]
        for sid, fields, m in zip(ids, per_subject, masks or [None] * len(ids)):
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
            n_real = int(np.prod(tshape)) if m is None else int(m.sum())
            if n_real == 0:
                raise ValueError(f"subject {sid!r}: no trials (empty subject)")
        # 2. text fields -> integer codes, one vocabulary per field over all subjects
        categories: dict[str, list] = {}
        for j, name in enumerate(names):
            if any(_is_text(fields[j]) for fields in per_subject):
                labels = set()
                for sid, fields in zip(ids, per_subject):
                    values = fields[j]
                    if values.dtype.kind == "O":
                        odd = [i for i, v in enumerate(values.ravel()) if not isinstance(v, str)]
                        if odd:
                            pos = tuple(int(p) for p in np.unravel_index(odd[0], values.shape))
                            raise ValueError(
                                f"subject {sid!r}: field '{name}' holds text labels but has the missing or "
                                f"non-text value {values[pos]!r} at index {pos}"
                            )
                    labels.update(values.ravel().tolist())
                vocab = sorted(labels)
                lookup = {lab: i for i, lab in enumerate(vocab)}
                categories[name] = vocab
                for fields in per_subject:
                    a = fields[j]
                    fields[j] = np.vectorize(lookup.__getitem__, otypes=[np.int64])(a) if a.size else a.astype(np.int64)
        # 3. numeric checks and padding
        t_max = tuple(int(x) for x in np.max([f[0].shape[:k] for f in per_subject], axis=0))
        S = len(per_subject)
        mask = np.zeros((S, *t_max), dtype=bool)
        for i, fields in enumerate(per_subject):
            tshape = fields[0].shape[:k]
            region = (i, *(slice(0, n) for n in tshape))
            mask[region] = True if masks is None else masks[i]
        out: dict[str, torch.Tensor] = {}
        for j, name in enumerate(names):
            arrays = []
            for sid, fields in zip(ids, per_subject):
                a = fields[j]
                if a.dtype.kind == "O":
                    try:
                        a = a.astype(float)
                    except (TypeError, ValueError):
                        raise ValueError(f"subject {sid!r}: field '{name}' holds values that are not numbers") from None
                if a.dtype.kind == "b":
                    a = a.astype(np.int64)
                if a.dtype.kind not in "iuf":
                    raise ValueError(f"subject {sid!r}: field '{name}' has unsupported dtype {a.dtype}")
                arrays.append(a)
            integer = all(a.dtype.kind in "iu" for a in arrays)
            np_dtype = np.int64 if integer else np.float64
            padded = np.zeros((S, *t_max, *feature_shapes[j]), dtype=np_dtype)
            for i, (sid, a) in enumerate(zip(ids, arrays)):
                if not integer:  # padding added while reading blocks is zero, so any NaN is real data
                    bad = ~np.isfinite(a)
                    if bad.any():
                        pos = tuple(int(p) for p in np.argwhere(bad)[0])
                        raise ValueError(
                            f"subject {sid!r}: field '{name}' has a non-finite value (NaN or inf) "
                            f"at index {pos}; remove or fill such trials"
                        )
                padded[(i, *(slice(0, n) for n in a.shape))] = a
            tensor = torch.from_numpy(padded)
            out[name] = tensor.to(device=device, dtype=None if integer else dtype)
        return cls(out, torch.from_numpy(mask).to(device), list(ids), categories)
