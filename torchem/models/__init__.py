"""The model library, one module per family.

Every model is a batched torch likelihood ``fit_func(params (S, P), *data,
mask=None, output="nll")`` carrying its parameter names, transforms, data
inputs and simulator (``fit_func.simulate``).  :data:`MODELS` names them for
the command line and the widgets.

pyEM 1.0's names come from the registry: for every model ``<name>`` in
:data:`MODELS`, the module that defines its fit also holds ``<name>_sim``
(the simulator) and ``<name>_model`` (a :class:`~torchem.model.ModelSpec`
bundle of ``id``, ``spec``, ``desc``, ``sim`` and ``fit``), unless the module
defines that name itself.  A model added to :data:`MODELS` gets them without
further code.  ``rl_mf``, ``rl_mb`` and ``social_discounting`` are pyEM's
module names for parts of ``rl``, ``twostep`` and ``discounting``.
"""
from __future__ import annotations

import inspect
import re
import sys
from typing import Callable

from ..model import ModelSpec
from . import bayes, ddm, discounting, glm, pt, rl, sdt, twostep

__all__ = ["rl", "twostep", "bayes", "glm", "sdt", "pt", "discounting", "ddm", "MODELS", "get_model"]

#: Library models by name.
MODELS: dict[str, Callable] = {
    "rw1a1b": rl.rw1a1b_fit,
    "rw2a1b": rl.rw2a1b_fit,
    "rw3a1b": rl.rw3a1b_fit,
    "rw4a1b": rl.rw4a1b_fit,
    "hybrid_mbmf": twostep.hybrid_mbmf_fit,
    "model_based": twostep.model_based_fit,
    "sarsa_lambda": twostep.sarsa_lambda_fit,
    "bayes": bayes.bayes_fit,
    "glm": glm.glm_fit,
    "glm_decay": glm.glm_decay_fit,
    "logit": glm.logit_fit,
    "logit_decay": glm.logit_decay_fit,
    "glm_ar": glm.glm_ar_fit,
    "sdt": sdt.sdt_fit,
    "pt": pt.pt_fit,
    "sd_hyp_wk": discounting.sd_hyp_wk_fit,
    "sd_hyp_k": discounting.sd_hyp_k_fit,
    "sd_par_k": discounting.sd_par_k_fit,
    "sd_lin_k": discounting.sd_lin_k_fit,
    "td_hyp_k": discounting.td_hyp_k_fit,
    "prd_hyp_k": discounting.prd_hyp_k_fit,
    "ed_par_k": discounting.ed_par_k_fit,
    "ped_par_k": discounting.ped_par_k_fit,
    "ped_par_2k": discounting.ped_par_2k_fit,
    "ddm4": ddm.ddm4_fit,
    "ddm4_lotto": ddm.ddm4_lotto_fit,
    "ddm7": ddm.ddm7_fit,
    "ddm7_lotto": ddm.ddm7_lotto_fit,
    "rlddm": ddm.rlddm_fit,
}


def get_model(name: str) -> Callable:
    """The library ``fit_func`` called ``name`` (e.g. ``"rw1a1b"``)."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}") from None


def _bundle(name: str, fit: Callable, sim: Callable | None) -> ModelSpec:
    """pyEM's ``ModelSpec`` of a registry model: description and spec from the fit's own declarations."""
    summary = (inspect.getdoc(fit) or name).split("\n\n")[0].replace("\n", " ")
    summary = re.sub(r":\w+:`([^`]*)`", r"\1", summary).replace("``", "")  # plain text, no reST roles
    xforms = [getattr(t, "__name__", repr(t)) for t in fit.param_xform]
    params = ", ".join(f"{p} ({t})" for p, t in zip(fit.param_names, xforms))
    if getattr(fit, "params_for_data", None) is not None:
        params += "; one weight per predictor column (shown for three)"
    desc = f"{summary}\nFree parameters: {params}.\nData: {', '.join(fit.inputs)}."
    spec = {"family": fit.__module__.rsplit(".", 1)[-1], "params": dict(zip(fit.param_names, xforms)),
            "inputs": list(fit.inputs)}
    return ModelSpec(id=name, spec=spec, desc=desc, params=None, sim=sim, fit=fit)


def _add_pyem_names() -> None:
    """Give every registry model pyEM's ``<name>_sim`` and ``<name>_model`` in the module of its fit."""
    for name, fit in MODELS.items():
        module = sys.modules[fit.__module__]
        exported = getattr(module, "__all__", None)
        if not hasattr(module, f"{name}_sim") and fit.simulate is not None:
            setattr(module, f"{name}_sim", fit.simulate)
            if exported is not None:
                exported.append(f"{name}_sim")
        if not hasattr(module, f"{name}_model"):
            setattr(module, f"{name}_model", _bundle(name, fit, getattr(module, f"{name}_sim", fit.simulate)))
            if exported is not None:
                exported.append(f"{name}_model")


_add_pyem_names()
