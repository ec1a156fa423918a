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
(``param_names``, ``param_xform``, ``inputs``, ``simulate``, ``check_data``),
so ``EMModel(all_data, rw1a1b_fit)`` needs nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .transforms import identity

__all__ = ["Model", "model_spec", "check_categorical", "reject_subject", "natural_params"]


def model_spec(
    *,
    param_names: Sequence[str],
    param_xform: Sequence[Callable],
    inputs: Sequence[str],
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
        fn.check_data = check_data
        fn.params_for_data = params_for_data
        fn.simulate = None
        return fn

    return wrap


def natural_params(params, names: Sequence[str]) -> np.ndarray:
    """``params`` as a float ``(S, P)`` array for a simulator, or a ``ValueError`` naming the ``P`` parameters."""
    params = np.asarray(params, dtype=float)
    if params.ndim != 2 or params.shape[1] != len(names):
        raise ValueError(f"params must be (subjects, {len(names)}) natural values [{', '.join(names)}], "
                         f"got shape {params.shape}")
    return params


def reject_subject(batch, bad, field_index: int, what: str) -> None:
    """Raise ``ValueError`` naming the first subject with a ``bad`` real trial and the field, if there is one.

    ``bad`` is a bool tensor over the subject and trial axes (already restricted
    to real trials); the message reads ``subject <id>: field '<name>' <what>``.
    """
    if bad.any():
        s = int(bad.reshape(len(batch), -1).any(1).nonzero()[0])
        raise ValueError(f"subject {batch.subject_ids[s]!r}: field '{batch.names[field_index]}' {what}")


def check_categorical(batch, field_index: int, n_options: int) -> None:
    """Raise ``ValueError`` unless field ``field_index`` holds codes ``0..n_options-1`` on real trials."""
    name = batch.names[field_index]
    values = batch.data[field_index]
    if values.is_floating_point():
        reject_subject(batch, (values != values.round()) & batch.mask, field_index, "must hold integer option codes")
    bad = ((values < 0) | (values >= n_options)) & batch.mask
    if bad.any():
        s = int(bad.reshape(len(batch), -1).any(1).nonzero()[0])
        where = tuple(int(i) for i in bad[s].nonzero()[0])
        raise ValueError(
            f"subject {batch.subject_ids[s]!r}: field '{name}' has value {values[s][where].item()!r} at trial "
            f"index {where}; expected option codes 0..{n_options - 1}"
        )


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

        A model whose parameters follow the data (``fit_func.params_for_data``)
        takes its names and transforms from ``batch`` when the caller gives none.
        """
        for_data = getattr(fit_func, "params_for_data", None)
        if param_names is None and for_data is not None and batch is not None:
            param_names, data_xform = for_data(batch)
            param_xform = data_xform if param_xform is None else param_xform
        names = param_names if param_names is not None else getattr(fit_func, "param_names", None)
        if names is None:
            raise ValueError("param_names is required for a fit_func that does not declare its parameters")
        if param_xform is None:
            param_xform = getattr(fit_func, "param_xform", None) if param_names is None or \
                list(param_names) == getattr(fit_func, "param_names", None) else None
        sim = simulate_func if simulate_func is not None else getattr(fit_func, "simulate", None)
        return cls(fit_func, list(names), list(param_xform or []), sim, per_subject)

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
