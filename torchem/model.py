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

pyEM-style functions
--------------------
A function with pyEM's signature ``f(params, *data, prior=None,
output="npl")`` (recognised by its ``prior`` argument) is called with
``prior=None`` and ``output="npl"``, which pyEM defines as the NLL when there
is no prior; torchem adds the prior itself.  Such a function is written for
one subject, so it is batched with ``vmap`` unless ``per_subject=False`` is
given.  It must compute with torch operations: :meth:`Model.check_data`
evaluates it once on the first subject and stops with an error pointing to
``docs/migrating_from_pyem.md`` if it returns a numpy or Python number (no
gradient) or fails on tensors.  Without a ``mask`` argument it cannot skip
padded trials, so every subject must then have the same trial shape.

Library models carry their defaults as attributes set by :func:`model_spec`
(``param_names``, ``param_xform``, ``inputs``, ``categorical``, ``responses``,
``simulate``, ``check_data``), so ``EMModel(all_data, rw1a1b_fit)`` needs
nothing else.

Own derivatives
---------------
A batched function may carry ``fit_func.value_and_grad(params, *data,
mask=None) -> (nll (S,), grad (S, P))`` and ``fit_func.hessian(params, *data,
mask=None) -> (S, P, P)``: the same negative log-likelihood's exact gradient
and Hessian, computed without autograd (the DDMs do).  The E-step's L-BFGS
and its exact Hessians then call them (:meth:`Model.nll_and_grad`,
:meth:`Model.nll_hessian`) instead of running autograd through ``fit_func``;
everything else goes through ``fit_func``.  Tests should compare them with
autograd through ``fit_func``.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .curvature import batched_hessian
from .data import _missing_hint
from .optim import value_and_grad
from .transforms import identity

__all__ = ["Model", "ModelSpec", "model_spec", "data_roles", "check_categorical", "reject_subject", "natural_params",
           "is_pyem_style", "MIGRATION_GUIDE"]

#: Where the migration guide for pyEM models lives (named in error messages).
MIGRATION_GUIDE = "docs/migrating_from_pyem.md"


def _parameters(fn: Callable) -> dict:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return {}


def is_pyem_style(fit_func: Callable) -> bool:
    """Whether ``fit_func`` has pyEM's signature ``f(params, *data, prior=None, output="npl")``.

    torchem's own contract has no ``prior`` argument (the EM code adds the
    prior), so a ``prior`` parameter identifies a function written for pyEM.
    """
    return "prior" in _parameters(fit_func)


@dataclass(frozen=True)
class ModelSpec:
    """pyEM's self-describing bundle of a model: ``<name>_model`` in the model modules.

    Attributes
    ----------
    id : str
        The model's name (its key in :data:`torchem.models.MODELS`).
    spec : dict
        Free-form description: ``family``, ``params`` (name -> transform),
        ``inputs`` (the data fields, in order).
    desc : str
        One-paragraph description (the first paragraph of the fit's docstring).
    params : callable or None
        pyEM's optional parameter helper; ``None`` for every library model, as in pyEM.
    sim : callable
        The simulator, ``sim(natural_params (S, P), **kwargs) -> dict``.
    fit : callable
        The batched likelihood (torchem's contract), ready for ``EMModel(all_data, spec.fit)``.
    """

    id: str
    spec: dict
    desc: str
    params: Callable | None
    sim: Callable | None
    fit: Callable


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
    pyem_style : bool
        ``fit_func`` has pyEM's signature ``f(params, *data, prior=None,
        output="npl")``: it is called with ``prior=None`` (see the module docstring).
    """

    fit_func: Callable
    param_names: list[str]
    param_xform: list[Callable] = field(default_factory=list)
    simulate_func: Callable | None = None
    per_subject: bool = False
    pyem_style: bool = False

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
                per_subject: bool | None = None, batch=None) -> "Model":
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

        ``per_subject=None`` means: written for one subject exactly when it
        has pyEM's signature (:func:`is_pyem_style`).
        """
        pyem = is_pyem_style(fit_func)
        per_subject = pyem if per_subject is None else bool(per_subject)
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
        return cls(fit_func, names, list(xform or []), sim, per_subject, pyem)

    @property
    def n_params(self) -> int:
        return len(self.param_names)

    @property
    def inputs(self) -> list[str] | None:
        """Declared data field names, if the function declares them."""
        return getattr(self.fit_func, "inputs", None)

    @functools.cached_property
    def takes_mask(self) -> bool:
        """Whether ``fit_func`` accepts ``mask`` (torchem's contract always does; a pyEM function may not)."""
        params = _parameters(self.fit_func)
        return "mask" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    def check_data(self, batch, dtype: torch.dtype = torch.float64) -> None:
        """Run the model's own data check (if any) on a :class:`SubjectBatch`.

        A function written for one subject is first evaluated on the first
        subject (:meth:`_probe`), so a function that cannot run on tensors
        fails here with a clear message rather than inside autograd.
        """
        check = getattr(self.fit_func, "check_data", None)
        if check is not None:
            check(batch)
        if self.pyem_style and not self.takes_mask and not bool(batch.mask.all()):
            n = batch.n_obs
            s = int((n < batch.mask[0].numel()).nonzero()[0])
            raise ValueError(
                f"subject {batch.subject_ids[s]!r} has {int(n[s])} trials where others have "
                f"{batch.mask[0].numel()}: the pyEM-style fit_func {self._name()} has no `mask` argument, so it "
                f"cannot ignore the padding of shorter subjects; add `mask=None` to its signature and leave padded "
                f"trials out of the sum (see {MIGRATION_GUIDE})")
        if self.per_subject or self.pyem_style:
            self._probe(batch, dtype)

    def _name(self) -> str:
        return getattr(self.fit_func, "__name__", "fit_func")

    def _call_one(self, f: Callable, p, m, d, output: str):
        """One call in the function's own convention (pyEM's ``prior=None, output="npl"`` or torchem's)."""
        if not self.pyem_style:
            return f(p, *d, mask=m, output=output)
        kw = {"mask": m} if self.takes_mask else {}
        out = f(p, *d, prior=None, output="npl" if output == "nll" else output, **kw)
        if output == "all" and isinstance(out, dict):  # keep the tensors (vmap returns only tensors)
            out = {k: torch.stack(list(v), -1) if isinstance(v, (list, tuple)) and v
                   and all(isinstance(a, torch.Tensor) for a in v) else v for k, v in out.items()}
            out = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        return out

    def _probe(self, batch, dtype: torch.dtype = torch.float64) -> None:
        """Evaluate the function once on the first subject; raise a ``ValueError`` that explains a failure."""
        x = torch.zeros(1, self.n_params, dtype=dtype, device=batch.device).requires_grad_(True)
        sid = batch.subject_ids[0] if batch.subject_ids else 0
        if self.per_subject:
            p, m, d = x[0], batch.mask[0], [f[0] for f in batch.data]
        else:
            p, m, d = x, batch.mask[:1], [f[:1] for f in batch.data]
        how = (f"A function given to torchem must compute with torch operations on its tensor arguments "
               f"(torch.exp, torch.where, ...), not numpy or float(), so that autograd can differentiate it; "
               f"see {MIGRATION_GUIDE}")
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. float() on a tensor: the error below says what is wrong
            try:
                out = self._call_one(self.fit_func, p, m, d, "nll")
            except Exception as err:  # any failure on tensors is reported with the guide
                raise ValueError(f"fit_func {self._name()} failed on subject {sid!r} with tensor inputs "
                                 f"({type(err).__name__}: {err}). {how}") from err
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"fit_func {self._name()} returned a {type(out).__module__}.{type(out).__name__} "
                             f"for subject {sid!r}, which cannot be differentiated. {how}")
        if out.numel() != 1 or not out.is_floating_point():
            raise ValueError(f"fit_func {self._name()} returned a tensor of shape {tuple(out.shape)} and dtype "
                             f"{out.dtype} for one subject; expected a real scalar (the negative log-likelihood)")
        if not out.requires_grad:
            raise ValueError(f"fit_func {self._name()} returned a value that does not depend on params through "
                             f"torch operations (no gradient), e.g. after float() or numpy. {how}")
        if self.per_subject:  # and batched over (up to) two subjects, as the fit will call it
            n = min(2, len(batch))
            self(x.detach().expand(n, -1), tuple(f[:n] for f in batch.data), batch.mask[:n])

    def __call__(self, params: torch.Tensor, data: tuple[torch.Tensor, ...], mask: torch.Tensor,
                 output: str = "nll"):
        """Evaluate the likelihood for ``params`` ``(S, P)``; ``(S,)`` or a dict for ``output="all"``."""
        f = self.fit_func
        if not self.per_subject:
            return self._call_one(f, params, mask, data, output)

        def one(p, m, *d):
            return self._call_one(f, p, m, d, output)

        try:
            return torch.func.vmap(one)(params, mask, *data)
        except RuntimeError as err:
            if "vmap" not in str(err):  # not a batching problem (e.g. out of memory): unchanged
                raise
            raise ValueError(
                f"fit_func {self._name()} runs for one subject but not batched over subjects ({err}). Typical "
                f"causes: a Python `if` on a parameter or data value (use torch.where), writing into a "
                f"preallocated array (collect values in a list and torch.stack them), or .item()/float() on a "
                f"tensor; see {MIGRATION_GUIDE}") from err

    def has_own(self, derivative: str) -> bool:
        """Whether ``fit_func`` supplies ``derivative`` (``"value_and_grad"`` or ``"hessian"``; see "Own
        derivatives" in the module notes)."""
        return (not self.per_subject and not self.pyem_style
                and callable(getattr(self.fit_func, derivative, None)))

    def nll_and_grad(self, params: torch.Tensor, data: tuple[torch.Tensor, ...],
                     mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(S,)`` negative log-likelihood and its exact ``(S, P)`` gradient at ``params``.

        From ``fit_func.value_and_grad`` where the function has one, else by autograd through :meth:`nll`.
        """
        if self.has_own("value_and_grad"):
            f, g = self.fit_func.value_and_grad(params.detach(), *data, mask=mask)
            if f.shape != params.shape[:1] or g.shape != params.shape:
                raise ValueError(f"{self._name()}.value_and_grad must return shapes ({params.shape[0]},) and "
                                 f"{tuple(params.shape)}, got {tuple(f.shape)} and {tuple(g.shape)}")
            return f.detach(), g.detach()
        return value_and_grad(lambda z, _: self.nll(z, data, mask), params, None)

    def nll_hessian(self, params: torch.Tensor, data: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
        """``(S, P, P)`` exact Hessians of the negative log-likelihood at ``params``.

        From ``fit_func.hessian`` where the function has one, else :func:`~torchem.curvature.batched_hessian`.
        """
        if self.has_own("hessian"):
            H = self.fit_func.hessian(params.detach(), *data, mask=mask)
            if H.shape != params.shape + params.shape[-1:]:
                raise ValueError(f"{self._name()}.hessian must return shape {tuple(params.shape + params.shape[-1:])}, "
                                 f"got {tuple(H.shape)}")
            return H.detach()
        return batched_hessian(lambda z: self.nll(z, data, mask), params)

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
