r"""Posterior predictive checks: does the fitted model reproduce the data?

Every subject is simulated ``nsims`` times with parameters drawn from its
posterior (:mod:`torchem.posterior`: Laplace, importance, or fixed at the
MAP), summary statistics are computed on the observed data and on every
replicate, and the observed values are compared with their predictive
distribution, per subject and averaged over (groups of) subjects.

How a replicate is made
-----------------------
A model family describes how its data arise (:class:`Family`):

- :class:`Response` steps draw the subject's responses from the model's own
  per-trial predictive distribution (``fit_func(..., output="all")``, e.g.
  the choice probabilities ``ch_prob``), so the simulated agent is exactly
  the fitted likelihood;
- :class:`Outcome` steps draw what the task returns (rewards, second-stage
  states) given the simulated responses, by resampling the subject's own
  observed outcomes: the outcome of choosing option ``o`` on trial ``t`` of
  block ``b`` is the outcome of a random trial of the same block on which the
  subject chose ``o`` (within ``window`` trials of ``t`` when the task's
  outcome probabilities drift).  An option the subject never chose in that
  block takes an outcome of the same option from another block, and one it
  never chose at all an outcome of any of its trials (the share of such
  draws is reported as ``PPCResult.fallback``).

Learning models are simulated *closed loop* (``sequential=True``): trial by
trial, the agent's own simulated choices and outcomes drive its learning, as
when it did the task (Palminteri, Wyart & Koechlin 2017).  Each trial calls
the likelihood on the trials so far (blocks side by side), which costs
``O(T^2)`` trial updates per subject, all replicates of a chunk in one
batched call on the fit's device.  Models whose responses do not feed back
(regressions, signal detection, choice models) draw every trial at once.

Statistics
----------
A statistic is a function of a :class:`Replicate` (a mapping from the
model's input names to ``(n, *trial_shape)`` tensors, with the ``mask`` and
the ``observed`` data of the same subjects) that returns ``(n,)``, ``(n, K)``
or a dict of ``(n,)`` tensors (NaN where it is undefined for a subject).
Built-in statistics come with each family; users add their own::

    def late_accuracy(d):
        return masked_mean((d["choices"] == 0).double(), d.mask)   # (n,)

    ppc = model.ppc(nsims=200, statistics={"late accuracy": late_accuracy})

A new model family plugs in with one call, as the drift-diffusion models do::

    register(ddm4_fit, Family(steps=(first_passage(ddm4_fit.param_names),),
                              statistics={"RT quantiles by choice": rt_quantiles_by_choice("rt", "choice")},
                              sequential=False, exchangeable=True))
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .data import SubjectBatch
from .em import FitResult
from .importance import pairs_per_call
from .model import Model
from .models import MODELS, bayes, ddm, discounting, glm, pt, rl, sdt, twostep
from .posterior import posterior_draws

__all__ = [
    "Replicate", "Statistic", "Response", "Outcome", "Family", "PPCResult",
    "register", "family_of", "posterior_predictive", "simulate_replicates",
    "categorical", "bernoulli", "gaussian", "masked_mean",
    "better_option_rate", "win_stay_lose_shift", "twostep_stay", "fitted", "field_mean", "field_sd",
    "choice_rates", "rt_quantiles_by_choice", "first_passage",
]

KINDS = ("curve", "points", "fitted")


# --------------------------------------------------------------------------------------------- replicates
class Replicate(Mapping):
    """One batch of data sets (observed or simulated) as seen by a statistic.

    A read-only mapping from the model's input names (and the data's own
    field names) to ``(n, *trial_shape[, features])`` tensors.

    Attributes
    ----------
    mask : Tensor
        ``(n, *trial_shape)`` bool, ``True`` on real trials.
    observed : Replicate or None
        The observed data of the same subjects (``None`` on the observed data itself).
    """

    def __init__(self, fields: Sequence[torch.Tensor], names: Sequence[str], mask: torch.Tensor,
                 observed: "Replicate | None" = None, aliases: Sequence[str] | None = None) -> None:
        self._names = list(names)
        self._fields = dict(zip(self._names, fields))
        self._alias = {a: n for a, n in zip(aliases or [], self._names) if a not in self._fields}
        self.mask = mask
        self.observed = observed

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._fields:
            return self._fields[key]
        if key in self._alias:
            return self._fields[self._alias[key]]
        raise KeyError(f"no data field {key!r}; fields are {self._names}")

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    @property
    def n(self) -> int:
        """Rows (subject replicates)."""
        return int(self.mask.shape[0])


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dims: Sequence[int] | None = None) -> torch.Tensor:
    """Mean of ``x`` over the real trials (``mask``) along ``dims`` (default: every trial axis); NaN where none."""
    dims = tuple(range(1, mask.dim())) if dims is None else tuple(dims)
    m = mask.to(torch.float64)
    num = (torch.where(mask, x.to(torch.float64), 0.0)).sum(dims)
    den = m.sum(dims)
    return torch.where(den > 0, num / den.clamp_min(1.0), torch.full_like(num, math.nan))


def _blocks(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(n, T)`` data as ``(n, 1, T)``; ``(n, B, T)`` unchanged."""
    return x.unsqueeze(1) if mask.dim() == 2 else x


def _previous(x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` on the previous trial of the same block ``(n, B, T-1)`` and whether both trials are real."""
    return x[..., :-1], m[..., :-1] & m[..., 1:]


# --------------------------------------------------------------------------------------------- statistics
@dataclass
class Statistic:
    """A summary statistic of a data set and how to draw it.

    Parameters
    ----------
    fn : callable
        ``fn(replicate) -> (n,)``, ``(n, K)`` or ``{label: (n,)}``; NaN where undefined.
    kind : {"curve", "points", "fitted"}
        ``"curve"``: ordered cells (a learning curve), drawn as a line with
        a band; ``"points"``: separate cells with intervals; ``"fitted"``:
        one value per trial, checked as observed against fitted (the
        predictive mean), binned at the group level.
    xlabel : str
        Axis label of the cells.
    """

    fn: Callable[[Replicate], Any]
    kind: str = "points"
    xlabel: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    def __call__(self, rep: Replicate) -> tuple[torch.Tensor, list[str]]:
        """``(n, K)`` float64 values and the ``K`` cell labels."""
        out = self.fn(rep)
        if isinstance(out, Mapping):
            labels = [str(k) for k in out]
            values = torch.stack([torch.as_tensor(v).to(torch.float64).reshape(rep.n) for v in out.values()], 1)
        else:
            values = torch.as_tensor(out).to(torch.float64)
            if values.dim() == 1:
                values = values[:, None]
            values = values.reshape(rep.n, -1)
            labels = [str(k + 1) for k in range(values.shape[1])] if values.shape[1] > 1 else ["value"]
        return values, labels


def better_option_rate(choice: str = "choices", reward: str = "rewards", by: str = "trial",
                       n_options: int = 2) -> Statistic:
    """Choice rate of the better option per trial of a block (a learning curve) or per block.

    The better option of a block is the one with the higher mean reward when
    chosen in that block, computed the same way on the observed data and on
    every replicate (so the statistic is one function of a data set); an
    option never chosen in the block counts as the worse one.
    """
    if by not in ("trial", "block"):
        raise ValueError(f"by must be 'trial' or 'block', got {by!r}")

    def fn(d: Replicate) -> torch.Tensor:
        m = _blocks(d.mask, d.mask)
        c, r = _blocks(d[choice], d.mask).long(), _blocks(d[reward], d.mask).to(torch.float64)
        means = []
        for o in range(n_options):
            sel = (c == o) & m
            means.append(torch.where(sel.any(-1), masked_mean(r, sel, (-1,)), -math.inf))
        better = torch.stack(means, -1).argmax(-1)  # (n, B)
        hit = (c == better[..., None]).to(torch.float64)
        return masked_mean(hit, m, (1,)) if by == "trial" else masked_mean(hit, m, (2,))

    return Statistic(fn, kind="curve", xlabel="trial of block" if by == "trial" else "block")


def win_stay_lose_shift(choice: str = "choices", reward: str = "rewards") -> Statistic:
    """Win-stay and lose-shift rates: repeat the previous choice after a reward > 0, switch after a reward <= 0."""

    def fn(d: Replicate) -> dict:
        m = _blocks(d.mask, d.mask)
        c, r = _blocks(d[choice], d.mask), _blocks(d[reward], d.mask)
        c_prev, both = _previous(c, m)
        stay = (c[..., 1:] == c_prev).to(torch.float64)
        win = r[..., :-1] > 0
        return {"win-stay": masked_mean(stay, both & win), "lose-shift": masked_mean(1.0 - stay, both & ~win)}

    return Statistic(fn, kind="points")


def twostep_stay(choice1: str = "choices1", state2: str = "states2", reward: str = "rewards") -> Statistic:
    """Two-step task: probability of repeating the first-stage choice by the previous reward x transition.

    A transition is common when the second-stage state equals the
    first-stage choice (the task's coding); rewarded means reward > 0.
    """

    def fn(d: Replicate) -> dict:
        m = _blocks(d.mask, d.mask)
        c1, s2, r = (_blocks(d[k], d.mask) for k in (choice1, state2, reward))
        c_prev, both = _previous(c1, m)
        stay = (c1[..., 1:] == c_prev).to(torch.float64)
        common = s2[..., :-1] == c_prev
        win = r[..., :-1] > 0
        out = {}
        for w_name, w in (("rewarded", win), ("unrewarded", ~win)):
            for t_name, tr in (("common", common), ("rare", ~common)):
                out[f"{w_name}, {t_name}"] = masked_mean(stay, both & w & tr)
        return out

    return Statistic(fn, kind="points", xlabel="previous trial")


def fitted(field_name: str) -> Statistic:
    """The response on every trial (NaN on padded trials), checked as observed against fitted."""

    def fn(d: Replicate) -> torch.Tensor:
        y = d[field_name].to(torch.float64)
        return torch.where(d.mask, y, math.nan).reshape(d.n, -1)

    return Statistic(fn, kind="fitted", xlabel="fitted (predictive mean)")


def field_mean(field_name: str) -> Statistic:
    """Mean of a field over the subject's real trials."""
    return Statistic(lambda d: masked_mean(d[field_name], d.mask), kind="points")


def field_sd(field_name: str) -> Statistic:
    """Standard deviation of a field over the subject's real trials."""

    def fn(d: Replicate) -> torch.Tensor:
        y = d[field_name].to(torch.float64)
        mu = masked_mean(y, d.mask)
        return masked_mean((y - mu.reshape((-1,) + (1,) * (y.dim() - 1))) ** 2, d.mask).sqrt()

    return Statistic(fn, kind="points")


def choice_rates(choice: str = "choices", n_options: int = 2) -> Statistic:
    """Share of trials on which each option was chosen."""
    return Statistic(lambda d: {f"option {o}": masked_mean((d[choice] == o).to(torch.float64), d.mask)
                                for o in range(n_options)}, kind="points")


def rt_quantiles_by_choice(rt: str = "rt", choice: str = "choice", q: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
                           n_options: int = 2) -> Statistic:
    """Response-time quantiles for each choice, and the choice proportions (for diffusion models)."""
    qs = torch.tensor(list(q), dtype=torch.float64)

    def fn(d: Replicate) -> dict:
        t = d[rt].to(torch.float64).reshape(d.n, -1)
        c = d[choice].reshape(d.n, -1)
        m = d.mask.reshape(d.n, -1)
        out = {}
        for o in range(n_options):
            sel = m & (c == o)
            vals = torch.nanquantile(torch.where(sel, t, math.nan), qs.to(t.device), dim=1)  # (Q, n)
            for k, qq in enumerate(q):
                out[f"choice {o} q{qq:g}"] = vals[k]
            out[f"p(choice {o})"] = masked_mean((c == o).to(torch.float64), m)
        return out

    return Statistic(fn, kind="points")


# --------------------------------------------------------------------------------------------- families
@dataclass
class Response:
    """A step that draws response fields from the model's per-trial predictive distribution.

    Parameters
    ----------
    fields : tuple of str
        The model input names the step writes (e.g. ``("choices",)``).
    keys : tuple of str
        Per-trial outputs of ``fit_func(..., output="all")`` the draw uses,
        shaped ``(n, *trial_shape, ...)`` (e.g. ``("ch_prob",)``).
    draw : callable
        ``draw(values, natural, uniform) -> {field: tensor}``: ``values`` maps
        each key to its value on the trial(s) drawn (the trial axis removed
        for a sequential family), ``natural`` maps parameter names to
        ``(n,)`` natural values, ``uniform(shape)`` draws uniforms on the
        device from the check's seeded generator.
    """

    fields: tuple[str, ...]
    keys: tuple[str, ...]
    draw: Callable[[dict, dict, Callable], dict]


@dataclass
class Outcome:
    """A step that draws task outcomes given the simulated responses, from the subject's own observed outcomes.

    Parameters
    ----------
    fields : tuple of str
        Outcome fields, drawn jointly from one observed trial (e.g. ``("rewards",)``).
    given : tuple of str
        Fields whose values select the observed trials to draw from (e.g. ``("choices",)``).
    window : int, optional
        Draw from trials within this many trials of the current one (for
        outcome probabilities that drift); ``None``: the whole block.
    """

    fields: tuple[str, ...]
    given: tuple[str, ...]
    window: int | None = None


@dataclass
class Family:
    """How a model family's data arise, and what to check.

    Parameters
    ----------
    steps : tuple of Response and Outcome
        Per-trial order of the draws (e.g. choose, then get rewarded).
    statistics : dict
        Built-in statistics by name.
    sequential : bool
        Responses feed back into later trials (learning): simulate trial by
        trial, closed loop.  ``False``: draw every trial at once.
    exchangeable : bool
        Trials are exchangeable given the parameters (no learning, no
        trial-order effects), so cross-validation may hold out single trials.
    """

    steps: tuple
    statistics: dict = field(default_factory=dict)
    sequential: bool = True
    exchangeable: bool = False

    def __post_init__(self) -> None:
        if not self.sequential and any(isinstance(s, Outcome) for s in self.steps):
            raise ValueError("Outcome steps need a sequential family (outcomes follow the simulated responses)")
        self.statistics = {k: v if isinstance(v, Statistic) else Statistic(v) for k, v in self.statistics.items()}


_FAMILIES: dict[Callable, Family] = {}


def register(fit_funcs: Callable | Sequence[Callable], family: Family) -> None:
    """Register ``family`` for one or more ``fit_func``\\ s (used by :meth:`EMModel.ppc` and cross-validation)."""
    for f in ([fit_funcs] if callable(fit_funcs) else fit_funcs):
        _FAMILIES[f] = family


def family_of(fit_func: Callable) -> Family | None:
    """The registered :class:`Family` of ``fit_func`` (or of the library model it configures), or ``None``."""
    return _FAMILIES.get(fit_func) or _FAMILIES.get(getattr(fit_func, "base_fit", None))


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-row ``(n,)`` values broadcast against ``like`` ``(n, ...)``."""
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def categorical(field_name: str, key: str = "ch_prob") -> Response:
    """Draw option codes from per-trial probabilities ``key`` ``(..., K)``."""

    def draw(values: dict, natural: dict, uniform: Callable) -> dict:
        p = values[key]
        cdf = p.cumsum(-1)
        u = uniform(p.shape[:-1]) * cdf[..., -1]
        return {field_name: (cdf < u[..., None]).sum(-1).clamp(max=p.shape[-1] - 1)}

    return Response((field_name,), (key,), draw)


def bernoulli(field_name: str, key: str) -> Response:
    """Draw 0/1 responses with ``P(1)`` given per trial by the output ``key``."""

    def draw(values: dict, natural: dict, uniform: Callable) -> dict:
        p = values[key]
        return {field_name: (uniform(p.shape) < p).long()}

    return Response((field_name,), (key,), draw)


def gaussian(field_name: str, mean_key: str, sd_param: str) -> Response:
    """Draw ``N(mean, sd^2)`` responses: the mean per trial from output ``mean_key``, the SD a parameter."""

    def draw(values: dict, natural: dict, uniform: Callable) -> dict:
        mean = values[mean_key]
        z = torch.special.ndtri(uniform(mean.shape).clamp(1e-12, 1 - 1e-12))
        return {field_name: mean + _view(natural[sd_param], mean) * z}

    return Response((field_name,), (mean_key,), draw)


def first_passage(param_names: Sequence[str]) -> Response:
    """Draw ``rt`` and ``choice`` of a drift-diffusion model from its per-trial drift ``v`` and the subject's
    boundary, non-decision time, start point and across-trial variabilities (exact first passages,
    :func:`torchem.models.ddm.draw_trials`; the likelihood's small contaminant share is not simulated).

    The draws run on the CPU (numpy), seeded from the check's generator.
    """
    names = [n for n in param_names if n in ("a", "t0", "z", "sv", "st", "sz")]

    def draw(values: dict, natural: dict, uniform: Callable) -> dict:
        v = values["v"]
        rng = np.random.default_rng(int(uniform(()) * 2 ** 62))
        p = np.stack([np.ones(v.shape[0])] + [natural[n].detach().cpu().numpy() for n in names], 1)
        rt, choice, _ = ddm.draw_trials(p, ["v_coef", *names], v.detach().cpu().numpy(), rng)
        return {"rt": torch.as_tensor(rt, dtype=v.dtype, device=v.device),
                "choice": torch.as_tensor(choice, device=v.device)}

    return Response(("rt", "choice"), ("v",), draw)


# --------------------------------------------------------------------------------------------- simulation
def _pick(match: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of a uniformly chosen ``True`` along the last axis of ``match`` (by ``u`` in [0, 1)), and whether any."""
    count = match.sum(-1)
    k = (u * count).floor().long().clamp(min=0)
    k = torch.minimum(k, (count - 1).clamp(min=0))
    idx = (match.long().cumsum(-1) <= k[..., None]).sum(-1).clamp(max=match.shape[-1] - 1)
    return idx, count > 0


def _resample(step: Outcome, rep: dict, obs: dict, mask: torch.Tensor, t: int, uniform: Callable) -> torch.Tensor:
    """Draw ``step``'s outcome fields on trial ``t`` of every block; returns ``(n, B)`` bool: drawn from a fallback."""
    m3 = _blocks(mask, mask)
    n, B, T = m3.shape
    match = m3.clone()
    for g in step.given:
        match &= _blocks(obs[g], mask) == _blocks(rep[g], mask)[..., t:t + 1]
    u = uniform((n, B))
    idx, ok = _pick(match, u)  # a trial of the same block with the same condition
    if step.window is not None:
        near = (torch.arange(T, device=mask.device) - t).abs() <= step.window
        idx_w, ok_w = _pick(match & near, u)
        idx = torch.where(ok_w, idx_w, idx)
    flat = idx + T * torch.arange(B, device=mask.device)  # (n, B) index into the subject's B*T trials
    idx_b, ok_b = _pick(match.reshape(n, 1, B * T).expand(n, B, B * T), u)  # same condition, any block
    idx_a, _ = _pick(m3.reshape(n, 1, B * T).expand(n, B, B * T), u)  # any real trial of the subject
    flat = torch.where(ok, flat, torch.where(ok_b, idx_b, idx_a))
    real = m3[..., t]
    for f in step.fields:
        value = _blocks(obs[f], mask).reshape(n, B * T).gather(1, flat)
        dst = _blocks(rep[f], mask)  # a view: writing it writes rep[f]
        dst[..., t] = torch.where(real, value.to(dst.dtype), dst[..., t])
    return ~ok & real


def simulate_replicates(model: Model, family: Family, x: torch.Tensor, data: Sequence[torch.Tensor],
                        mask: torch.Tensor, generator: torch.Generator,
                        names: Sequence[str] | None = None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Simulate one data set per row of ``x`` on the design of ``data``.

    Parameters
    ----------
    model : Model
        The likelihood (its ``output="all"`` provides the per-trial predictive distributions).
    family : Family
        How the data arise.
    x : Tensor
        ``(n, P)`` normalized parameters.
    data : sequence of Tensor
        The observed fields of the subjects being replicated, ``(n, *trial_shape, ...)``.
    mask : Tensor
        ``(n, *trial_shape)``.
    generator : torch.Generator
        Generator on ``x``'s device.
    names : sequence of str, optional
        Model input names of the fields (default: ``model.inputs``).

    Returns
    -------
    fields : tuple of Tensor
        Simulated fields, same shapes and dtypes as ``data`` (padded trials keep the observed values).
    fallback : Tensor
        ``(n,)`` number of outcomes drawn from another block or unconditionally.
    """
    names = list(names or model.inputs or [])
    if len(names) != len(data):
        raise ValueError(f"{len(data)} data fields but {len(names)} input names {names}")
    obs = dict(zip(names, data))
    rep = {k: v.clone() for k, v in obs.items()}
    natural = dict(zip(model.param_names, model.to_natural(x).unbind(-1)))
    device = x.device
    fallback = torch.zeros(x.shape[0], dtype=torch.long, device=device)

    def uniform(shape) -> torch.Tensor:
        return torch.rand(tuple(shape), generator=generator, dtype=x.dtype, device=device)

    def write(drawn: dict, sel: Callable[[torch.Tensor], torch.Tensor], m: torch.Tensor) -> None:
        for f, v in drawn.items():
            dst = sel(rep[f])
            dst.copy_(torch.where(m.reshape(m.shape + (1,) * (dst.dim() - m.dim())), v.to(dst.dtype), dst))

    tdim = mask.dim() - 1
    for s in family.steps:
        for f in (s.fields + getattr(s, "given", ())):
            if f not in obs:
                raise ValueError(f"the family uses a field {f!r} the data do not have; fields are {names}")
    with torch.no_grad():
        if not family.sequential:
            out = model(x, tuple(rep[k] for k in names), mask, output="all")
            for step in family.steps:
                write(step.draw({k: out[k] for k in step.keys}, natural, uniform), lambda z: z, mask)
            return tuple(rep[k] for k in names), fallback
        for t in range(mask.shape[-1]):
            out = None
            m_t = mask.select(tdim, t)
            for step in family.steps:
                if isinstance(step, Response):
                    if out is None:
                        out = model(x, tuple(rep[k].narrow(tdim, 0, t + 1) for k in names),
                                    mask.narrow(tdim, 0, t + 1), output="all")
                    values = {k: out[k].select(tdim, t) for k in step.keys}
                    write(step.draw(values, natural, uniform), lambda z: z.select(tdim, t), m_t)
                else:
                    fallback += _resample(step, rep, obs, mask, t, uniform).sum(-1)
                out = None  # the data changed: outputs are stale
    return tuple(rep[k] for k in names), fallback


# --------------------------------------------------------------------------------------------- the check
@dataclass
class PPCResult:
    """Observed and simulated summary statistics of a posterior predictive check.

    Attributes
    ----------
    statistics : dict[str, Statistic]
    labels : dict[str, list[str]]
        Cell labels of every statistic.
    observed_values : dict[str, ndarray]
        ``(S, K)`` observed values per statistic.
    simulated_values : dict[str, ndarray]
        ``(nsims, S, K)`` simulated values per statistic.
    subject_ids : list
    draws : str
        Where the parameters came from (``"map"``, ``"laplace"``, ``"importance"``).
    fallback : float
        Share of simulated outcomes drawn from another block or regardless of
        the response (the subject never made that response in the block).
    """

    statistics: dict
    labels: dict
    observed_values: dict
    simulated_values: dict
    subject_ids: list
    draws: str
    fallback: float = 0.0

    @property
    def nsims(self) -> int:
        return int(next(iter(self.simulated_values.values())).shape[0])

    def __repr__(self) -> str:
        return (f"PPCResult({len(self.subject_ids)} subjects x {self.nsims} replicates, draws={self.draws!r}, "
                f"statistics {list(self.statistics)})")

    def _long(self, values: dict, sim: bool) -> pd.DataFrame:
        frames = []
        for name, v in values.items():
            labels = self.labels[name]
            if sim:
                n, S, K = v.shape
                idx = pd.MultiIndex.from_product([range(n), self.subject_ids, labels], names=["sim", "subject", "cell"])
            else:
                S, K = v.shape
                idx = pd.MultiIndex.from_product([self.subject_ids, labels], names=["subject", "cell"])
            frames.append(pd.DataFrame({"statistic": name, "value": v.reshape(-1)}, index=idx).reset_index())
        cols = (["sim"] if sim else []) + ["subject", "statistic", "cell", "value"]
        return pd.concat(frames, ignore_index=True)[cols]

    @property
    def observed(self) -> pd.DataFrame:
        """Tidy observed statistics: ``subject``, ``statistic``, ``cell``, ``value``."""
        return self._long(self.observed_values, sim=False)

    @property
    def simulated(self) -> pd.DataFrame:
        """Tidy simulated statistics: ``sim``, ``subject``, ``statistic``, ``cell``, ``value``."""
        return self._long(self.simulated_values, sim=True)

    def _groups(self, groups: Any) -> tuple[np.ndarray, list]:
        """Group label per subject and the groups in order."""
        S = len(self.subject_ids)
        if groups is None:
            lab = np.array(["all"] * S, dtype=object)
        elif isinstance(groups, (pd.Series, Mapping)):
            g = pd.Series(groups) if isinstance(groups, Mapping) else groups
            missing = [s for s in self.subject_ids if s not in g.index]
            if missing:
                raise ValueError(f"groups has no label for subject(s) {missing[:10]}")
            lab = g.loc[self.subject_ids].to_numpy(dtype=object)
        else:
            lab = np.asarray(groups, dtype=object)
            if lab.shape != (S,):
                raise ValueError(f"groups must give one label per subject ({S}), got shape {lab.shape}")
        order = list(pd.unique(pd.Series(lab)))
        return lab, order

    def summary(self, level: str = "group", groups: Any = None, interval: float = 0.95, bins: int = 10,
                statistics: Sequence[str] | None = None) -> pd.DataFrame:
        """Observed statistics against their predictive distribution.

        Parameters
        ----------
        level : {"group", "subject"}
            ``"group"``: the mean over the subjects of each group (the
            replicate of a group mean averages the subjects' replicates of
            the same simulation); ``"fitted"`` statistics are binned by their
            predictive mean (``bins`` bins).  ``"subject"``: every subject's
            own value.
        groups : Series, dict or array, optional
            Group label per subject (indexed by subject id, or in subject
            order); default one group ``"all"``.
        interval : float
            Central predictive interval.
        statistics : list of str, optional
            Which statistics (default all).

        Returns
        -------
        DataFrame
            ``group`` (or ``subject``), ``statistic``, ``cell``, ``x`` (cell
            position; the fitted value for ``"fitted"`` statistics),
            ``observed``, ``mean``, ``lower``, ``upper``, ``covered`` and
            ``ppp`` (posterior predictive p-value ``P(T_rep > T_obs) + P(T_rep = T_obs) / 2``).
        """
        if level not in ("group", "subject"):
            raise ValueError(f"level must be 'group' or 'subject', got {level!r}")
        lo_q, hi_q = (1 - interval) / 2, 1 - (1 - interval) / 2
        lab, order = self._groups(groups)
        rows = []
        for name in statistics or list(self.statistics):
            if name not in self.statistics:
                raise ValueError(f"unknown statistic {name!r}; statistics are {list(self.statistics)}")
            obs, sim, kind = self.observed_values[name], self.simulated_values[name], self.statistics[name].kind
            labels = self.labels[name]
            if level == "subject":
                units = [(sid, obs[i:i + 1], sim[:, i:i + 1]) for i, sid in enumerate(self.subject_ids)]
            else:
                units = [(g, obs[lab == g], sim[:, lab == g]) for g in order]
            for unit, o, s in units:
                if kind == "fitted" and level == "group":
                    o_c, s_c, x_c, cells = _bin_fitted(o, s, bins)
                else:
                    with _quiet():
                        o_c, s_c = np.nanmean(o, 0), np.nanmean(s, 1)  # (K,), (nsims, K)
                        x_c = np.nanmean(s, (0, 1)) if kind == "fitted" else np.arange(1, len(labels) + 1)
                    cells = labels
                rows.extend(_interval_rows(unit, name, cells, x_c, o_c, s_c, lo_q, hi_q))
        key = "subject" if level == "subject" else "group"
        return pd.DataFrame(rows, columns=[key, "statistic", "cell", "x", "observed", "mean", "lower", "upper",
                                           "covered", "ppp"])

    def coverage(self, level: str = "subject", groups: Any = None, interval: float = 0.95) -> pd.Series:
        """Share of observed values inside their central predictive interval, per statistic."""
        s = self.summary(level, groups, interval)
        s = s[np.isfinite(s["observed"]) & np.isfinite(s["lower"])]
        return s.groupby("statistic", sort=False)["covered"].mean()

    def plot(self, **kwargs):
        """:func:`torchem.plotting.plot_ppc` of this check."""
        from .plotting import plot_ppc
        return plot_ppc(self, **kwargs)


@contextlib.contextmanager
def _quiet():
    """Silence numpy's warnings about all-NaN slices (a statistic undefined for every subject of a cell)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _interval_rows(unit, name, cells, x, o, s, lo_q, hi_q) -> list:
    """One summary row per cell: observed, predictive mean, interval, covered, posterior predictive p-value."""
    with _quiet():
        mean = np.nanmean(s, 0)
        lower, upper = np.nanquantile(s, lo_q, 0), np.nanquantile(s, hi_q, 0)
        finite = np.isfinite(s)
        n = finite.sum(0)
        gt = np.where(finite, s > o, False).sum(0)
        eq = np.where(finite, s == o, False).sum(0)
        ppp = np.where(n > 0, (gt + 0.5 * eq) / np.maximum(n, 1), np.nan)
    covered = (lower <= o) & (o <= upper)
    return [(unit, name, c, float(xx), float(oo), float(mm), float(lo), float(hi), bool(cv), float(pp))
            for c, xx, oo, mm, lo, hi, cv, pp in zip(cells, x, o, mean, lower, upper, covered, ppp)]


def _bin_fitted(obs: np.ndarray, sim: np.ndarray, bins: int):
    """Bin the trials of a per-trial statistic by their fitted value (predictive mean), equal counts per bin.

    The observed data are binned by the mean of all replicates; replicate
    ``j`` by the mean of the others (leave one out), so no data set takes
    part in its own binning.  Returns observed ``(nb,)`` and replicate
    ``(nsims, nb)`` bin means, the mean fitted value per bin and labels.
    """
    n = sim.shape[0]
    ok = np.isfinite(obs) & np.isfinite(sim).all(0)
    o, s = obs[ok], sim[:, ok]  # (N,), (n, N)
    N = o.size
    if N == 0:
        return np.full(1, np.nan), np.full((n, 1), np.nan), np.full(1, np.nan), ["bin 1"]
    nb = max(1, min(bins, N))
    total = s.sum(0)
    pred = total / n

    def bin_of(p: np.ndarray) -> np.ndarray:  # rank -> one of nb bins of (nearly) equal counts
        rank = np.empty(N, dtype=int)
        rank[np.argsort(p, kind="stable")] = np.arange(N)
        return rank * nb // N

    def means(values: np.ndarray, which: np.ndarray) -> np.ndarray:
        return np.bincount(which, values, nb) / np.maximum(np.bincount(which, minlength=nb), 1)

    which = bin_of(pred)
    s_b = np.stack([means(s[j], bin_of((total - s[j]) / (n - 1))) for j in range(n)])
    return means(o, which), s_b, means(pred, which), [f"bin {b + 1}" for b in range(nb)]


def _statistics(family: Family | None, statistics: Any, builtin: bool) -> dict[str, Statistic]:
    out: dict[str, Statistic] = dict(family.statistics) if (builtin and family is not None) else {}
    if statistics is None:
        pass
    elif isinstance(statistics, Mapping):
        out.update({k: v if isinstance(v, Statistic) else Statistic(v) for k, v in statistics.items()})
    else:
        for f in ([statistics] if callable(statistics) else statistics):
            name = getattr(f, "__name__", None) or getattr(getattr(f, "fn", None), "__name__", "statistic")
            out[name] = f if isinstance(f, Statistic) else Statistic(f)
    if not out:
        raise ValueError("no statistics to check: pass statistics={'name': function}")
    return out


def posterior_predictive(model: Model, batch: SubjectBatch, result: FitResult, *, nsims: int = 100,
                         draws: str = "posterior", seed: int | None = 0, statistics: Any = None,
                         builtin: bool = True, family: Family | None = None, chunk: int | None = None,
                         nsamples: int = 4000, verbose: int = 0) -> PPCResult:
    """Posterior predictive check of a fitted model (the work behind :meth:`EMModel.ppc`).

    Parameters
    ----------
    model, batch, result
        The model, its data and its fit.
    nsims : int
        Replicates per subject.
    draws : {"posterior", "importance", "laplace", "map"}
        Parameters of each replicate: drawn from the subject's posterior
        under the fitted group prior (``"posterior"`` = ``"importance"``:
        importance-weighted draws, resampled; ``"laplace"``: the Gaussian at
        the MAP with the inverse Hessian) or fixed at the MAP.
    seed : int
        Seed of the parameter draws and the simulation.
    statistics : dict, callable or list, optional
        User statistics (functions of a :class:`Replicate`, or :class:`Statistic`).
    builtin : bool
        Include the family's built-in statistics.
    family : Family, optional
        How to simulate (default: the registered family of ``model.fit_func``).
    chunk : int, optional
        Replicates simulated per batched call (default: a size that bounds
        memory to about that of one likelihood call on the device).
    nsamples : int
        Weighted draws per subject behind ``draws="importance"``.
    verbose : int
        1: a tqdm bar over chunks.

    Returns
    -------
    PPCResult
    """
    family = family or family_of(model.fit_func)
    if family is None:
        name = getattr(model.fit_func, "__name__", "fit_func")
        raise ValueError(f"no posterior predictive family is registered for {name}: describe how its data arise "
                         "with torchem.ppc.register(fit_func, Family(...)) or pass family=Family(...)")
    if nsims < 2:
        raise ValueError(f"nsims must be at least 2, got {nsims}")
    stats = _statistics(family, statistics, builtin)
    names = list(model.inputs or batch.names)
    if len(names) != len(batch.names):
        names = batch.names
    S = batch.n_subjects
    device = batch.device
    gen = torch.Generator()
    gen.manual_seed(0 if seed is None else int(seed))
    theta = posterior_draws(model, batch, result, nsims, draws, gen, nsamples=nsamples)  # (nsims, S, P)
    dev_gen = torch.Generator(device=device)
    dev_gen.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    observed = Replicate(batch.data, names, batch.mask, None, batch.names)
    obs_vals, labels = {}, {}
    for name, st in stats.items():
        v, lab = st(observed)
        obs_vals[name], labels[name] = v.cpu().numpy(), lab
    total = nsims * S
    cells = max(1, batch.mask[0].numel())
    chunk = chunk or pairs_per_call(cells, device)
    sim_vals = {name: np.empty((total, len(labels[name]))) for name in stats}
    fallback = torch.zeros((), dtype=torch.long, device=device)
    for lo in tqdm(range(0, total, chunk), desc="PPC", disable=not verbose):
        rows = torch.arange(lo, min(lo + chunk, total), device=device)
        subj, j = rows % S, rows // S
        data = tuple(d[subj] for d in batch.data)
        mask = batch.mask[subj]
        fields, fb = simulate_replicates(model, family, theta[j, subj], data, mask, dev_gen, names)
        fallback += fb.sum()
        rep = Replicate(fields, names, mask, Replicate(data, names, mask, None, batch.names), batch.names)
        for name, st in stats.items():
            v, lab = st(rep)
            if lab != labels[name]:
                raise ValueError(f"statistic {name!r} returned cells {lab} on simulated data but {labels[name]} on "
                                 "the observed data; a statistic must return the same cells for every data set")
            sim_vals[name][lo:lo + rows.numel()] = v.cpu().numpy()
    n_out = sum(len(s.fields) > 0 for s in family.steps if isinstance(s, Outcome))
    real = float(batch.mask.sum()) * nsims * max(n_out, 1)
    kind = "importance" if draws == "posterior" else draws
    return PPCResult(stats, labels, obs_vals, {k: v.reshape(nsims, S, -1) for k, v in sim_vals.items()},
                     list(batch.subject_ids), kind, float(fallback) / real if n_out else 0.0)


# --------------------------------------------------------------------------------------------- the library
_BANDIT_STATS = {"p(better) by trial": better_option_rate(by="trial"),
                 "p(better) by block": better_option_rate(by="block"),
                 "win-stay / lose-shift": win_stay_lose_shift()}
register([rl.rw1a1b_fit, rl.rw2a1b_fit],
         Family((categorical("choices"), Outcome(("rewards",), ("choices",))), _BANDIT_STATS))
register(rl.rw3a1b_fit, Family((categorical("choices"),
                                Outcome(("rewards_self", "rewards_other", "rewards_noone"), ("choices",))),
                               {"choice rates": choice_rates("choices", 2)}))
register(rl.rw4a1b_fit, Family((categorical("choices"), Outcome(("outcomes_self", "outcomes_other"), ("choices",))),
                               {"choice rates": choice_rates("choices", 4)}))
register([twostep.hybrid_mbmf_fit, twostep.model_based_fit, twostep.sarsa_lambda_fit],
         Family((categorical("choices1", "ch_prob1"), Outcome(("states2",), ("choices1",)),
                 categorical("choices2", "ch_prob2"), Outcome(("rewards",), ("states2", "choices2"), window=20)),
                {"stay by reward x transition": twostep_stay()}))
register(bayes.bayes_fit, Family((categorical("choices"),), {"choice rates": choice_rates("choices", 3)},
                                 sequential=False))
_REG_STATS = {"fitted vs observed": fitted("Y"), "mean": field_mean("Y"), "sd": field_sd("Y")}
_LOGIT_STATS = {"fitted vs observed": fitted("Y"), "mean": field_mean("Y")}
register(glm.glm_fit, Family((gaussian("Y", "pred", "sigma"),), _REG_STATS, sequential=False, exchangeable=True))
register(glm.glm_decay_fit, Family((gaussian("Y", "pred", "sigma"),), _REG_STATS, sequential=False))
register(glm.glm_ar_fit, Family((gaussian("Y", "pred", "sigma"),), _REG_STATS))  # the mean follows y_{t-1}
register(glm.logit_fit, Family((bernoulli("Y", "p"),), _LOGIT_STATS, sequential=False, exchangeable=True))
register(glm.logit_decay_fit, Family((bernoulli("Y", "p"),), _LOGIT_STATS, sequential=False))
register(sdt.sdt_fit, Family((bernoulli("resp_old", "p_old"),),
                             {"hit / false-alarm rate": Statistic(
                                 lambda d: {"hit": masked_mean(d["resp_old"].double(), d.mask & (d["is_old"] == 1)),
                                            "false alarm": masked_mean(d["resp_old"].double(),
                                                                       d.mask & (d["is_old"] == 0))})},
                             sequential=False, exchangeable=True))
register(pt.pt_fit, Family((bernoulli("choice", "p_gamble"),),
                           {"fitted vs observed": fitted("choice"), "p(gamble)": field_mean("choice")},
                           sequential=False, exchangeable=True))
register([f for f in MODELS.values() if f.__module__ == discounting.__name__],
         Family((bernoulli("choices", "p_discounted"),),
                {"fitted vs observed": fitted("choices"), "choice rate": field_mean("choices")},
                sequential=False, exchangeable=True))
_DDM_STATS = {"RT quantiles by choice": rt_quantiles_by_choice("rt", "choice")}
for _fit in (ddm.ddm4_fit, ddm.ddm4_lotto_fit, ddm.ddm7_fit, ddm.ddm7_lotto_fit):
    register(_fit, Family((first_passage(_fit.param_names),), _DDM_STATS, sequential=False, exchangeable=True))
register(ddm.rlddm_fit, Family((first_passage(ddm.rlddm_fit.param_names), Outcome(("reward",), ("choice",))),
                               {**_DDM_STATS, "p(better) by trial": better_option_rate("choice", "reward")}))
