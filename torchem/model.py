"""What a model is: parameter names, transforms, a batched likelihood and a simulator.

The likelihood contract
-----------------------
``fit_func(params, *data, mask=None, output="nll")``

- ``params``: ``(S, P)`` tensor of *normalized* parameters;
- ``data``: the :class:`~torchem.data.SubjectBatch` fields, subjects first;
- ``mask``: ``(S, *trial_shape)`` bool, ``True`` on real trials; padded
  trials must not change the result;
- returns the per-subject negative log-likelihood ``(S,)``, or with
  ``output="all"`` a dict with at least ``params`` (natural, ``(S, P)``) and
  ``nll`` (``(S,)``) plus any trial-wise quantities.

The prior is never part of a model: the EM code adds it.  A function written
for one subject (``params`` ``(P,)``, data without the subject axis, returning
a scalar) is batched with ``torch.func.vmap`` when ``per_subject=True``.

Library models carry their defaults as attributes set by :func:`model_spec`
(``param_names``, ``param_xform``, ``inputs``, ``categorical``, ``responses``,
``simulate``, ``check_data``), so ``EMModel(all_data, rw1a1b_fit)`` needs
nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .data import _missing_hint
from .transforms import identity

__all__ = ["Model", "model_spec", "data_roles", "check_categorical", "reject_subject", "natural_params"]


def model_spec(
    *,
    param_names: Sequence[str],
    param_xform: Sequence[Callable],
    inputs: Sequence[str],
    categorical: Sequence[str | Sequence[str]] = (),
    responses: Sequence[str] = (),
    check_data: Callable | None = None,
    params_for_data: Callable | None = None,
) -> Callable[[Callable], Callable]:
    """Decorate a batched ``fit_func`` with its defaults.

    Parameters
    ----------
    param_names : sequence of str
        Parameter names in column order of ``params``.
    param_xform : sequence of callables
        Normalized -> natural transform of each parameter.
    inputs : sequence of str
        Names of the data fields, in the order the function takes them
        (also the DataFrame columns the command line expects by default).
    categorical : sequence, optional
        Inputs that hold option codes whose numbers are only names (which
        option was chosen or offered): only these may be given as text
        labels, coded ``0, 1, ...`` in sorted label order.  Inputs grouped in
        one entry share one coding (e.g. ``("choices", "option_left",
        "option_right")``).  Every other input is a number.
    responses : sequence of str, optional
        Inputs the subject produced.  Declaring them says the likelihood
        skips a masked trial in the middle of a sequence exactly as if the
        trial had not happened (no choice term, no learning); a missing
        value in a response then marks a missed trial with
        ``missing="skip"``.  Leave it empty where a skipped trial is not
        defined.
    check_data : callable, optional
        ``check_data(batch)`` raising ``ValueError`` on data the model cannot
        take (e.g. a choice out of range), naming the subject and field.
    params_for_data : callable, optional
        ``params_for_data(batch) -> (names, transforms)`` for a model whose
        parameters follow the data (a regression with one weight per
        predictor column); ``param_names``/``param_xform`` are then the
        defaults for the simulator's default design.
    """

    def wrap(fn: Callable) -> Callable:
        fn.param_names = list(param_names)
        fn.param_xform = list(param_xform)
        fn.inputs = list(inputs)
        known = set(fn.inputs)
        fn.categorical = [(c,) if isinstance(c, str) else tuple(c) for c in categorical]
        fn.responses = list(responses)
        unknown = [c for g in fn.categorical for c in g if c not in known] + [c for c in fn.responses
                                                                               if c not in known]
        if unknown:
            raise ValueError(f"{fn.__name__}: categorical/responses name unknown inputs {unknown}; "
                             f"inputs are {fn.inputs}")
        fn.check_data = check_data
        fn.params_for_data = params_for_data
        fn.simulate = None
        return fn

    return wrap


def data_roles(fit_func: Callable) -> tuple[list[tuple[int, ...]], list[int]]:
    """A model's declared ``(categorical groups, responses)`` as positions of its inputs (empty when undeclared)."""
    inputs = list(getattr(fit_func, "inputs", None) or [])
    groups = [tuple(inputs.index(c) for c in g) for g in getattr(fit_func, "categorical", ())]
    return groups, [inputs.index(c) for c in getattr(fit_func, "responses", ())]


def natural_params(params, names: Sequence[str]) -> np.ndarray:
    """``params`` as a float ``(S, P)`` array for a simulator, or a ``ValueError`` naming the ``P`` parameters."""
    params = np.asarray(params, dtype=float)
    if params.ndim != 2 or params.shape[1] != len(names):
        raise ValueError(f"params must be (subjects, {len(names)}) natural values [{', '.join(names)}], "
                         f"got shape {params.shape}")
    return params


def _first(batch, bad: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    """Batch index and trial position of the first ``True`` in ``bad`` ``(S, *trial_shape)``."""
    s = int(bad.reshape(len(batch), -1).any(1).nonzero()[0])
    return s, tuple(int(i) for i in bad[s].nonzero()[0])


def _show(value: torch.Tensor):
    """A tensor value as plain Python (``2`` rather than ``2.0`` for an integral float)."""
    v = value.tolist()
    return int(v) if isinstance(v, float) and v.is_integer() else v


def reject_subject(batch, bad, field_index: int, what: str) -> None:
    """Raise ``ValueError`` naming the first subject with a ``bad`` real trial, the field, the value and its row.

    ``bad`` is a bool tensor over the subject and trial axes (already restricted
    to real trials); the message reads ``subject <id>: field '<name>' <what>
    (value <v> at data row <r> ...)``.
    """
    if bad.any():
        s, pos = _first(batch, bad)
        value = _show(batch.data[field_index][s][pos])
        raise ValueError(f"subject {batch.subject_ids[s]!r}: field '{batch.names[field_index]}' {what} "
                         f"(value {value!r} at {batch.locate(s, pos)})")


def check_categorical(batch, field_index: int, n_options: int, codes: str | None = None) -> None:
    """Raise ``ValueError`` unless field ``field_index`` holds codes ``0..n_options-1`` on real trials.

    The message names the subject, the row and the value as given (a text
    label such as ``'C'`` or ``'.'``, not its code); codes ``1..n_options``
    get the instruction to shift them.  ``codes`` says what the codes mean
    (e.g. ``"1 = old, 0 = new"``) and is added to the message.
    """
    name = batch.names[field_index]
    values, mask = batch.data[field_index], batch.mask
    meaning = f" ({codes})" if codes else ""
    labels = batch.categories.get(name)
    if labels is not None and len(labels) > n_options:
        counts = [int(((values == k) & mask).sum()) for k in range(len(labels))]
        present = [k for k in range(len(labels)) if counts[k]]
        shared = [n for n, v in batch.categories.items() if n != name and v == labels]
        if len(present) <= n_options:
            raise ValueError(
                f"fields {[name, *shared]} share one coding of the options, but together they hold {len(labels)} "
                f"labels {labels} and the model takes {n_options} options; name the options with the same labels "
                "in these fields")
        rare = min(present, key=lambda k: (counts[k], -k))
        s, pos = _first(batch, (values == rare) & mask)
        listing = ", ".join(f"{labels[k]!r} ({counts[k]} trials)" for k in present)
        raise ValueError(
            f"subject {batch.subject_ids[s]!r}: field '{name}' has the label {labels[rare]!r} at "
            f"{batch.locate(s, pos)}, but the model takes {n_options} options and the data have {len(present)} "
            f"labels: {listing}{_missing_hint(labels[rare])}")
    if values.is_floating_point():
        reject_subject(batch, (values != values.round()) & mask, field_index, "must hold integer option codes")
    bad = ((values < 0) | (values >= n_options)) & mask
    if bad.any():
        s, pos = _first(batch, bad)
        real = values[mask]
        hint = ""
        if bool((real >= 1).all()) and int(real.max()) == n_options:
            hint = (f"; the codes look 1-based (1..{n_options}): subtract 1 from '{name}'"
                    + (" (first_option=1; command line: --first-option 1; dashboard Data tab: 'options coded "
                       "from 1'; or df[...] - 1 yourself)" if name in batch.categorical else
                       f" (e.g. df[{name!r}] - 1)"))
        raise ValueError(
            f"subject {batch.subject_ids[s]!r}: field '{name}' has value {_show(values[s][pos])!r} at "
            f"{batch.locate(s, pos)}; expected option codes 0..{n_options - 1}{meaning}{hint}")


@dataclass
class Model:
    """A likelihood with its parameter names and transforms, ready for batched fitting.

    Parameters
    ----------
    fit_func : callable
        Batched (or, with ``per_subject=True``, single-subject) likelihood.
    param_names : list of str
        Names of the ``P`` parameters.
    param_xform : list of callables
        Normalized -> natural transform per parameter (identity if omitted).
    simulate_func : callable, optional
        ``simulate_func(natural_params (S, P), **kwargs) -> dict``.
    per_subject : bool
        ``fit_func`` handles one subject; it is batched with ``torch.func.vmap``.
    """

    fit_func: Callable
    param_names: list[str]
    param_xform: list[Callable] = field(default_factory=list)
    simulate_func: Callable | None = None
    per_subject: bool = False

    def __post_init__(self) -> None:
        self.param_names = list(self.param_names)
        if not self.param_xform:
            self.param_xform = [identity] * len(self.param_names)
        self.param_xform = list(self.param_xform)
        if len(self.param_xform) != len(self.param_names):
            raise ValueError(
                f"{len(self.param_names)} parameter names but {len(self.param_xform)} transforms"
            )

    @classmethod
    def resolve(cls, fit_func: Callable, param_names=None, param_xform=None, simulate_func=None,
                per_subject: bool = False, batch=None) -> "Model":
        """Fill unspecified pieces from a library model's attributes.

        A library model's parameters may be renamed (``param_names`` in the
        same order); its transforms then follow the positions.  A model whose
        parameters follow the data (``fit_func.params_for_data``) takes its
        names and transforms from ``batch``.

        Raises
        ------
        ValueError
            More or fewer names or transforms than the model has parameters,
            repeated names, or no names for a model that declares none.
        """
        declared = getattr(fit_func, "param_names", None)
        declared_xform = getattr(fit_func, "param_xform", None)
        for_data = getattr(fit_func, "params_for_data", None)
        if for_data is not None and batch is not None:
            declared, declared_xform = for_data(batch)
        label = getattr(fit_func, "__name__", "fit_func")
        if declared is not None:
            declared = list(declared)
            for what, given in (("names", param_names), ("transforms", param_xform)):
                if given is not None and len(given) != len(declared):
                    raise ValueError(
                        f"{label} has {len(declared)} parameters ({', '.join(declared)}) but {len(given)} "
                        f"parameter {what} were given; rename the parameters in the same order, one {what[:-1]} "
                        "each")
        names = list(param_names) if param_names is not None else declared
        if names is None:
            raise ValueError("param_names is required for a fit_func that does not declare its parameters")
        if len(set(names)) != len(names):
            raise ValueError(f"parameter names must be unique, got {names}")
        xform = param_xform if param_xform is not None else (declared_xform if declared is not None else None)
        sim = simulate_func if simulate_func is not None else getattr(fit_func, "simulate", None)
        return cls(fit_func, names, list(xform or []), sim, per_subject)

    @property
    def n_params(self) -> int:
        return len(self.param_names)

    @property
    def inputs(self) -> list[str] | None:
        """Declared data field names, if the function declares them."""
        return getattr(self.fit_func, "inputs", None)

    def check_data(self, batch) -> None:
        """Run the model's own data check (if any) on a :class:`SubjectBatch`."""
        check = getattr(self.fit_func, "check_data", None)
        if check is not None:
            check(batch)

    def __call__(self, params: torch.Tensor, data: tuple[torch.Tensor, ...], mask: torch.Tensor,
                 output: str = "nll"):
        """Evaluate the likelihood for ``params`` ``(S, P)``; ``(S,)`` or a dict for ``output="all"``."""
        if not self.per_subject:
            return self.fit_func(params, *data, mask=mask, output=output)
        f = self.fit_func

        def one(p, m, *d):
            return f(p, *d, mask=m, output=output)

        return torch.func.vmap(one)(params, mask, *data)

    def nll(self, params: torch.Tensor, data: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
        """``(S,)`` negative log-likelihood; checks the shape the function returned."""
        out = self(params, data, mask, "nll")
        if not isinstance(out, torch.Tensor) or out.shape != params.shape[:1]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"fit_func must return the per-subject negative log-likelihood of shape ({params.shape[0]},), "
                f"got {shape}; pass per_subject=True for a function written for one subject"
            )
        return out

    def to_natural(self, x: torch.Tensor) -> torch.Tensor:
        """Map normalized ``x`` ``(..., P)`` to natural space column by column."""
        return torch.stack([t(x[..., j]) for j, t in enumerate(self.param_xform)], -1)
