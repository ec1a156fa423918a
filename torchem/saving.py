"""Save and load fitted results: tensors in one torch file, everything else as JSON text.

A file written by :func:`save_result` holds a plain dictionary of tensors,
strings and numbers, read back with ``torch.load(..., weights_only=True)``:
loading runs no pickled code, and a foreign or tampered file is refused with a
``ValueError``.  Parameter transforms are stored by name (the built-in ones
of :mod:`torchem.transforms`); a custom transform must be given again on load.
"""
from __future__ import annotations

import json
import os
from dataclasses import fields
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from .transforms import TRANSFORMS

__all__ = ["save_result", "load_result", "FORMAT", "VERSION"]

FORMAT = "torchem.FitResult"
VERSION = 1

_TENSORS = ("m", "inv_h", "NPL", "NLPrior", "NLL", "hess_logdet", "hessian_ok", "laplace_capped", "status", "n_obs")
_XFORM_NAMES = {fn: name for name, fn in TRANSFORMS.items()}


def _prior_state(prior) -> dict | None:
    from .groups import GroupFamily

    return prior.state_dict() if isinstance(prior, GroupFamily) else None


def _options_json(options) -> dict | None:
    """The options as JSON values: a group instance by its family name, a prior object left out."""
    if options is None:
        return None
    out = {}
    for f in fields(options):
        value = getattr(options, f.name)
        if f.name == "group" and not isinstance(value, str):
            value = getattr(value, "name", "gaussian")
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        out[f.name] = value
    return out


def save_result(result, path: str | os.PathLike) -> None:
    """Write ``result`` (a :class:`~torchem.em.FitResult`) to ``path``; see :meth:`FitResult.save`."""
    from .groups import GroupFamily

    if result.group is not None and not isinstance(result.group, GroupFamily):
        raise ValueError(f"only results with a group family or without a prior can be saved; this one has a "
                         f"{type(result.group).__name__} prior")
    ids = [s.item() if isinstance(s, np.generic) else s for s in result.subject_ids]
    meta = {
        "param_names": list(result.param_names),
        "subject_ids": [s if isinstance(s, (str, int, float)) else str(s) for s in ids],
        "subject_id_types": [type(s).__name__ for s in ids],
        "param_xform": [_XFORM_NAMES.get(fn, "custom") for fn in result.param_xform],
        "convergence": bool(result.convergence), "n_iter": int(result.n_iter), "stop_reason": result.stop_reason,
        "fixed_point_gap": result.fixed_point_gap,
        "warnings": list(result.warnings), "estep": result.estep, "stopped": bool(result.stopped),
        "options": _options_json(result.options),
        "history": json.loads(result.history.to_json(orient="split")),
    }
    tensors = {k: getattr(result, k).detach().cpu() for k in _TENSORS}
    if result.lme is not None:
        tensors["lme"] = result.lme.detach().cpu()
    if result.importance is not None:
        tensors.update({f"importance.{f.name}": getattr(result.importance, f.name).detach().cpu()
                        for f in fields(result.importance)})
    payload = {"format": FORMAT, "version": VERSION, "meta": json.dumps(meta), "tensors": tensors,
               "group": _cpu_state(_prior_state(result.group)),
               "estep_prior": _cpu_state(_prior_state(result.estep_prior))}
    torch.save(payload, os.fspath(path))


def _cpu_state(state: dict | None) -> dict | None:
    if state is None:
        return None
    return {"family": state["family"], "config": json.dumps(state["config"]),
            "hyper": {k: v.detach().cpu() for k, v in state["hyper"].items()}}


def _custom_xform(name: str) -> Callable:
    def missing(x):
        raise ValueError(f"the transform of parameter {name!r} was a custom function, which is not saved: give "
                         "param_xform= to FitResult.load (or load through EMModel.load)")
    return missing


def load_result(path: str | os.PathLike, *, map_location: Any = "cpu",
                param_xform: Sequence[Callable] | None = None):
    """Read a :class:`~torchem.em.FitResult` written by :func:`save_result`; see :meth:`FitResult.load`."""
    from .em import FitResult
    from .groups import group_from_state
    from .importance import ImportanceResult
    from .options import FitOptions

    path = os.fspath(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # an unpickling refusal, a truncated or non-torch file
        raise ValueError(f"{path} is not a torchem result file that can be loaded safely "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a torchem result file (no {FORMAT!r} format marker)")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path} has result format version {payload.get('version')!r}; this torchem reads "
                         f"version {VERSION}")
    try:
        meta = json.loads(payload["meta"])
        t = payload["tensors"]
        S, P = t["m"].shape
        for k in _TENSORS:
            if not isinstance(t[k], torch.Tensor) or t[k].shape[0] != S:
                raise ValueError(f"field {k!r} is not a tensor with {S} subjects")
        if len(meta["param_names"]) != P or len(meta["subject_ids"]) != S or len(meta["param_xform"]) != P:
            raise ValueError("the parameter names or subject ids do not match the tensors")

        def group(state):
            if state is None:
                return None
            return group_from_state({"family": state["family"], "config": json.loads(state["config"]),
                                     "hyper": state["hyper"]}, device=t["m"].device, dtype=t["m"].dtype)

        if param_xform is None:
            xform = [TRANSFORMS[n] if n in TRANSFORMS else _custom_xform(p)
                     for n, p in zip(meta["param_xform"], meta["param_names"])]
        else:
            xform = list(param_xform)
            if len(xform) != P:
                raise ValueError(f"param_xform has {len(xform)} transforms, the result {P} parameters")
        opts = meta["options"]
        options = None if opts is None else FitOptions(**opts)
        imp = None
        if "importance.mean" in t:
            imp = ImportanceResult(**{f.name: t[f"importance.{f.name}"] for f in fields(ImportanceResult)})
        hist = meta["history"]
        history = pd.DataFrame(hist["data"], columns=hist["columns"], index=hist["index"])
        ids = [int(s) if kind == "int" else s for s, kind in zip(meta["subject_ids"], meta["subject_id_types"])]
        return FitResult(
            **{k: t[k] for k in _TENSORS}, group=group(payload["group"]), convergence=meta["convergence"],
            n_iter=meta["n_iter"], history=history, param_names=meta["param_names"], subject_ids=ids,
            param_xform=xform, stop_reason=meta["stop_reason"], warnings=meta["warnings"], options=options,
            estep=meta["estep"], stopped=meta["stopped"], importance=imp, estep_prior=group(payload["estep_prior"]),
            lme=t.get("lme"), fixed_point_gap=meta.get("fixed_point_gap"))
    except ValueError as err:
        raise ValueError(f"{path}: damaged torchem result file: {err}") from None
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: damaged torchem result file ({type(err).__name__}: {err})") from None
