"""The model library, one module per family.

Every model is a batched torch likelihood ``fit_func(params (S, P), *data,
mask=None, output="nll")`` carrying its parameter names, transforms, data
inputs and simulator (``fit_func.simulate``).  :data:`MODELS` names them for
the command line and the widgets.
"""
from __future__ import annotations

from typing import Callable

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
