r"""Covariates in the group prior, and inference on their coefficients.

``fit(covariates=..., formula=...)`` replaces the group location by a
regression on subject covariates, ``theta_i = B^T x_i + e_i`` with Gaussian
(``N(0, Sigma)``) or Student-t / Cauchy deviations
(:class:`torchem.groups.CovariateGroup`), fitted by EM like any group family.
This module builds the design ``X`` ``(S, K)`` from the user's table and
computes the standard errors of ``B``.

Design
------
``covariates`` is a DataFrame indexed by subject id (or with a ``subject``
column), a Series, or an array with one row per subject in the data's
subject order.  Categorical columns (text, ``category``, ``bool``, or a term
written ``C(name)``) are dummy coded against their first level (sorted, or
the categorical's own order): a column ``group`` with levels ``control``,
``patient`` gives ``group[patient]``.  An intercept ``(Intercept)`` is added
unless the formula has ``0`` or ``-1``.  ``formula`` chooses which
covariates enter which parameter: one formula for all (``"~ group + age"``)
or a dict by parameter (``{"alpha": "~ group", "beta": "~ 1"}``; parameters
left out get an intercept only).  Every subject in the data needs its
covariates, and the table may not name subjects that are not in the data.

Standard errors (Louis 1982)
----------------------------
The coefficients maximize the marginal likelihood
``L(psi) = sum_i log int p(D_i | theta) g(theta; B^T x_i, psi) dtheta``
over ``psi`` (``B`` and the deviations' ``Sigma`` or scales).  Its observed
information is, with the complete-data log density
``l_i(psi; theta) = log g(theta; B^T x_i, psi)`` and expectations over subject
``i``'s posterior,

.. math::

    I(\hat\psi) = \sum_i \Big( E\big[-\nabla^2_\psi l_i\big] - \mathrm{Cov}\big[\nabla_\psi l_i\big] \Big),

the complete-data information minus the information lost because the
subjects' parameters are not observed.  The posteriors are those of the
E-step: Gaussian with the moments ``(m_i, V_i)`` the M-step used (the MAP and
inverse Hessian, or the importance-sampled mean and covariance), so both
terms are exact in closed form: ``l_i`` is quadratic in ``theta``, hence
``E[-grad^2 l_i] = -grad^2_psi (l_i(m_i) - tr(Sigma^-1 V_i) / 2)`` and, with
``J_i = d^2 l_i / dpsi dtheta`` and ``T_i = d^3 l_i / dpsi dtheta dtheta``,
``Cov[grad l_i] = J_i V_i J_i^T + tr(T_i V_i T_i V_i) / 2``; all derivatives
come from ``torch.func``.  The standard errors are the square roots of the
diagonal of ``I^-1`` for the coefficients (``Sigma``'s uncertainty included).
For a subject whose data say nothing (``V_i = Sigma``) the contribution to
the mean's information vanishes; for a perfectly measured one (``V_i = 0``)
it is the ordinary regression's ``x_i Sigma^-1 x_i^T``.  With a Gaussian
likelihood the formula is the exact marginal information (tested against the
Hessian of the closed-form marginal likelihood).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from .groups import CovariateGroup, GaussianGroup, GroupFamily, StudentTGroup

__all__ = ["Design", "build_design", "covariate_group", "louis_information", "coefficient_table"]

INTERCEPT = "(Intercept)"


@dataclass
class Design:
    """A group-level design.

    Attributes
    ----------
    X : ndarray
        ``(S, K)`` design, rows in the data's subject order.
    columns : list of str
        ``K`` column names (``(Intercept)``, numeric covariates, dummies ``name[level]``).
    free : ndarray
        ``(K, P)`` bool: column ``k`` enters parameter ``p``'s mean.
    """

    X: np.ndarray
    columns: list
    free: np.ndarray


def _table(covariates: Any, subject_ids: Sequence) -> pd.DataFrame:
    """The covariates as a DataFrame indexed by subject id, aligned to ``subject_ids`` (errors name subjects)."""
    ids = list(subject_ids)
    if isinstance(covariates, pd.Series):
        covariates = covariates.to_frame(covariates.name or "x")
    if isinstance(covariates, pd.DataFrame):
        df = covariates
        if not set(df.index) & set(ids) and "subject" in df.columns:
            df = df.set_index("subject")
        if not set(df.index) & set(ids):  # ids given as text for numeric subjects, or the reverse
            as_text = {str(i): i for i in ids}
            if set(map(str, df.index)) & set(as_text):
                df = df.set_axis([as_text.get(str(i), i) for i in df.index], axis=0)
        dup = df.index[df.index.duplicated()].unique().tolist()
        if dup:
            raise ValueError(f"covariates have more than one row for subject(s) {dup[:10]}")
        extra = [i for i in df.index if i not in set(ids)]
        if extra:
            raise ValueError(f"covariates name {len(extra)} subject(s) that are not in the data: {extra[:10]}"
                             f"{' ...' if len(extra) > 10 else ''}; drop them or fit those subjects too")
        missing = [i for i in ids if i not in set(df.index)]
        if missing:
            raise ValueError(f"no covariates for {len(missing)} subject(s) of the data: {missing[:10]}"
                             f"{' ...' if len(missing) > 10 else ''}")
        return df.loc[ids]
    arr = covariates.detach().cpu().numpy() if isinstance(covariates, torch.Tensor) else np.asarray(covariates)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] != len(ids):
        raise ValueError(f"covariates as an array need one row per subject ({len(ids)} in the data, in the data's "
                         f"subject order), got shape {arr.shape}; or pass a DataFrame indexed by subject id")
    names = ["x"] if arr.shape[1] == 1 else [f"x{k}" for k in range(arr.shape[1])]
    return pd.DataFrame(arr, index=pd.Index(ids), columns=names)


def _terms(formula: str, columns: Sequence[str]) -> tuple[bool, list[tuple[str, bool]]]:
    """Parse ``"~ a + C(b) - 1"``: whether to add an intercept and the terms ``(column, forced categorical)``."""
    text = formula.split("~", 1)[1] if "~" in formula else formula
    if any(op in text for op in (":", "*", "**", "/", "|")):
        raise ValueError(f"formula {formula!r}: interactions and nesting are not supported; add a product "
                         "column to the covariates instead")
    text = text.replace(" ", "")
    intercept = True
    if re.search(r"-1$|-1\+", text) or re.search(r"(^|\+)0($|\+)", text):
        intercept = False
    text = re.sub(r"-1(?=$|\+)", "", text)
    terms = []
    for part in filter(None, text.split("+")):
        if part in ("0", "1"):
            continue
        cat = re.fullmatch(r"C\((.+)\)", part)
        name = cat.group(1) if cat else part
        if name not in columns:
            raise ValueError(f"formula {formula!r}: no covariate column {name!r}; the covariates have {list(columns)}")
        terms.append((name, cat is not None))
    return intercept, terms


def _is_categorical(s: pd.Series) -> bool:
    return s.dtype.kind in "OSUb" or isinstance(s.dtype, pd.CategoricalDtype)


def build_design(covariates: Any, formula: str | dict | None, subject_ids: Sequence,
                 param_names: Sequence[str]) -> Design:
    """The design of a covariate group for these subjects and parameters (see the module docstring).

    Raises
    ------
    ValueError
        Subjects without covariates or not in the data, missing values (naming
        the subjects and the column), unknown columns or parameters, a
        categorical column with one level, or a design whose columns are
        collinear for some parameter.
    """
    df = _table(covariates, subject_ids)
    names = list(param_names)
    if formula is None or isinstance(formula, str):
        spec = {p: formula for p in names}
    elif isinstance(formula, dict):
        unknown = [p for p in formula if p not in names]
        if unknown:
            raise ValueError(f"formula names unknown parameter(s) {unknown}; parameters are {names}")
        spec = {p: formula.get(p, "~ 1") for p in names}
    else:
        raise ValueError(f"formula must be a string like '~ group + age' or a dict by parameter, got {formula!r}")
    parsed = {}
    for p, f in spec.items():
        parsed[p] = (True, [(c, False) for c in df.columns]) if f is None else _terms(f, df.columns)
    used = list(dict.fromkeys(c for _, terms in parsed.values() for c, _ in terms))
    forced = {c for _, terms in parsed.values() for c, cat in terms if cat}
    for c in used:
        bad = df[c].isna().to_numpy()
        if bad.any():
            who = [i for i, b in zip(df.index, bad) if b]
            raise ValueError(f"covariate {c!r} is missing for {len(who)} subject(s): {who[:10]}"
                             f"{' ...' if len(who) > 10 else ''}")
    blocks: dict[str, tuple[list[str], np.ndarray]] = {}
    for c in used:
        s = df[c]
        if c in forced or _is_categorical(s):
            levels = list(s.cat.categories) if isinstance(s.dtype, pd.CategoricalDtype) else sorted(s.unique().tolist())
            if len(levels) < 2:
                raise ValueError(f"categorical covariate {c!r} has a single level {levels}; it cannot be estimated")
            values = s.to_numpy()
            blocks[c] = ([f"{c}[{lev}]" for lev in levels[1:]],
                         np.column_stack([(values == lev).astype(float) for lev in levels[1:]]))
        else:
            try:
                blocks[c] = ([c], s.to_numpy(dtype=float)[:, None])
            except (TypeError, ValueError):
                raise ValueError(f"covariate {c!r} is neither numeric nor categorical") from None
            if not np.isfinite(blocks[c][1]).all():
                who = [i for i, v in zip(df.index, blocks[c][1][:, 0]) if not np.isfinite(v)]
                raise ValueError(f"covariate {c!r} is not finite for subject(s) {who[:10]}")
    any_intercept = any(icpt for icpt, _ in parsed.values())
    columns = ([INTERCEPT] if any_intercept else []) + [n for c in used for n in blocks[c][0]]
    X = np.column_stack(([np.ones(len(df))] if any_intercept else []) + [blocks[c][1] for c in used])
    free = np.zeros((len(columns), len(names)), dtype=bool)
    for j, p in enumerate(names):
        icpt, terms = parsed[p]
        if icpt:
            free[0, j] = True
        for c, _ in terms:
            for n in blocks[c][0]:
                free[columns.index(n), j] = True
        if not free[:, j].any():
            raise ValueError(f"parameter {p!r} has no intercept and no covariates; its group mean would be fixed at 0")
        sub = X[:, free[:, j]]
        if np.linalg.matrix_rank(sub) < sub.shape[1]:
            cols = [columns[k] for k in np.flatnonzero(free[:, j])]
            raise ValueError(f"the covariates of parameter {p!r} are collinear (or constant besides the intercept) "
                             f"over these subjects: {cols}")
    return Design(X, columns, free)


def covariate_group(base: GroupFamily, covariates: Any, formula: str | dict | None, subject_ids: Sequence,
                    param_names: Sequence[str], *, dtype: torch.dtype, device, var: float = 1.0) -> CovariateGroup:
    """The starting :class:`CovariateGroup` (coefficients 0, deviations of variance ``var``) around ``base``."""
    if not isinstance(base, (GaussianGroup, StudentTGroup)):
        raise ValueError(f"covariates work with the gaussian ('gaussian'/'diag', 'full'), student_t and cauchy "
                         f"groups, got {base.name!r}: a Laplace location regression (least absolute deviations "
                         "under posterior uncertainty) has no closed-form M-step")
    d = build_design(covariates, formula, subject_ids, param_names)
    P = len(param_names)
    return CovariateGroup(torch.as_tensor(d.X, dtype=dtype, device=device),
                          torch.zeros(len(d.columns), P, dtype=dtype, device=device), torch.as_tensor(d.free),
                          base.initial(P, var, dtype=dtype, device=device), d.columns)


def _logpdf(group: CovariateGroup) -> Callable:
    """``l(v, theta (P,), x (K,))``: log density of one subject's parameters as a pure function of the
    hyperparameter vector ``v`` (:meth:`CovariateGroup.to_vector`'s layout), for ``torch.func``."""
    P = group.n_params
    nb = int(group.free.sum())
    if group.gaussian:
        diagonal = group.base.diagonal
        i, j = torch.tril_indices(P, P, device=group.B.device)

        def chol(w: torch.Tensor) -> torch.Tensor:
            if diagonal:
                return torch.diag(torch.exp(0.5 * w))
            vals = torch.where(i == j, w.exp(), w)
            return torch.zeros(P, P, dtype=w.dtype, device=w.device).index_put((i, j), vals)

        def logpdf(v, theta, x):
            L = chol(v[nb:])
            z = torch.linalg.solve_triangular(L, (theta - x @ group.coefficients(v))[:, None], upper=False)[:, 0]
            return -0.5 * (z * z).sum() - L.diagonal().log().sum() - 0.5 * P * math.log(2 * math.pi)

        logpdf.chol = chol
        return logpdf
    df = group.base.df
    const = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def logpdf(v, theta, x):
        log_s = v[nb:]
        z2 = ((theta - x @ group.coefficients(v)) * torch.exp(-log_s)) ** 2
        return (const - log_s - 0.5 * (df + 1) * torch.log1p(z2 / df)).sum()

    return logpdf


def louis_information(group: CovariateGroup, m: torch.Tensor, V: torch.Tensor, nsamples: int = 4000,
                      seed: int = 0) -> torch.Tensor:
    """Observed information ``(d, d)`` of the marginal likelihood at ``group``'s hyperparameters.

    Parameters
    ----------
    group : CovariateGroup
        The fitted group; the information is over :meth:`~CovariateGroup.to_vector`
        (free coefficients first, then the deviations' log variances or
        Cholesky factor, or their log scales).
    m, V : Tensor
        ``(S, P)`` posterior means and ``(S, P, P)`` covariances of the subjects (the E-step moments).
    nsamples, seed : int
        Student-t deviations only: draws per subject from ``N(m_i, V_i)`` for the
        two expectations (a Gaussian's are in closed form).
    """
    psi = group.to_vector().detach()
    X = group.X
    logpdf = _logpdf(group)
    score = torch.func.jacrev(logpdf, argnums=0)
    if group.gaussian:
        P = group.n_params
        eye = torch.eye(P, dtype=psi.dtype, device=psi.device)
        nb = int(group.free.sum())

        def expected(v: torch.Tensor) -> torch.Tensor:  # sum_i E[l_i] under N(m_i, V_i)
            L = logpdf.chol(v[nb:])
            Linv = torch.linalg.solve_triangular(L, eye, upper=False)
            omega = Linv.T @ Linv
            return torch.func.vmap(logpdf, in_dims=(None, 0, 0))(v, m, X).sum() - 0.5 * (omega * V.sum(0)).sum()

        J = torch.func.vmap(torch.func.jacfwd(score, argnums=1), in_dims=(None, 0, 0))(psi, m, X)  # (S, d, P)
        T = torch.func.vmap(torch.func.jacfwd(torch.func.jacfwd(score, argnums=1), argnums=1),
                            in_dims=(None, 0, 0))(psi, m, X)  # (S, d, P, P)
        complete = -torch.func.hessian(expected)(psi)
        TV = T @ V.unsqueeze(1)
        missing = torch.einsum("sdp,sep->de", J @ V, J) + 0.5 * torch.einsum("sdpq,seqp->de", TV, TV)
    else:  # not quadratic in theta: Monte Carlo over the Gaussian posterior moments
        gen = torch.Generator()
        gen.manual_seed(int(seed))
        z = torch.randn(nsamples, *m.shape, generator=gen, dtype=m.dtype).to(m.device)
        theta = m + torch.einsum("spq,nsq->nsp", torch.linalg.cholesky(V), z)  # (n, S, P)
        each = torch.func.vmap(torch.func.vmap(logpdf, in_dims=(None, 0, 0)), in_dims=(None, 0, None))
        complete = -torch.func.hessian(lambda v: each(v, theta, X).sum() / nsamples)(psi)
        scores = torch.func.vmap(torch.func.vmap(score, in_dims=(None, 0, 0)), in_dims=(None, 0, None))(psi, theta, X)
        centred = scores - scores.mean(0)
        missing = torch.einsum("nsd,nse->de", centred, centred) / nsamples
    info = complete - missing
    return 0.5 * (info + info.T)


def coefficient_table(result, level: float = 0.95) -> pd.DataFrame:
    """Coefficients of a covariate fit with standard errors from Louis' observed information (the work
    behind ``FitResult.group_coefficients``)."""
    group = result.group
    if not isinstance(group, CovariateGroup):
        raise ValueError("the fit has no covariates in its group prior: fit(covariates=..., formula=...)")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    m, V = (result.importance.mean, result.importance.cov) if result.importance is not None else (result.m,
                                                                                                  result.inv_h)
    info = louis_information(group, m.detach(), V.detach())
    evals = torch.linalg.eigvalsh(info)
    nb = int(group.free.sum())
    if bool(evals.min() <= 0):
        cov = torch.full_like(info, math.nan)
    else:
        cov = torch.linalg.inv(info)
    se = cov.diagonal()[:nb].clamp_min(0).sqrt()
    est = group.B[group.free]
    fk, fp = group.free.nonzero(as_tuple=True)
    z = est / se
    p = 2.0 * torch.special.ndtr(-z.abs())
    q = float(torch.special.ndtri(torch.tensor(0.5 + level / 2, dtype=torch.float64)))
    lo_name, hi_name = f"{100 * (1 - level) / 2:g}%", f"{100 * (1 + level) / 2:g}%"
    df = pd.DataFrame({
        "parameter": [result.param_names[int(j)] for j in fp.tolist()],
        "covariate": [group.columns[int(k)] for k in fk.tolist()],
        "estimate": est.detach().cpu().numpy(), "se": se.detach().cpu().numpy(), "z": z.detach().cpu().numpy(),
        "p": p.detach().cpu().numpy(), lo_name: (est - q * se).detach().cpu().numpy(),
        hi_name: (est + q * se).detach().cpu().numpy(),
    })
    order = {n: i for i, n in enumerate(result.param_names)}
    df = df.sort_values(["parameter", "covariate"], key=lambda s: s.map(order) if s.name == "parameter" else
                        s.map({c: i for i, c in enumerate(group.columns)}), kind="stable")
    df = df.set_index(["parameter", "covariate"])
    if bool(evals.min() <= 0):
        import warnings
        msg = ("the observed information of the group parameters is not positive definite (a variance at its "
               "floor, or a coefficient the data cannot identify): standard errors are NaN")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return df
