"""pyEM's ``pyem.models.social_discounting``: the social discounting models of :mod:`torchem.models.discounting`.

Each model has its batched likelihood ``<name>_fit``, its simulator under
both names (``<name>_simulate``, pyEM's ``<name>_sim``) and pyEM's
``<name>_model`` bundle (:class:`~torchem.model.ModelSpec`).
"""
from __future__ import annotations

from .discounting import (SOCIAL_DISTS, SOCIAL_PAYOUTS, sd_hyp_k_fit, sd_hyp_k_model, sd_hyp_k_sim,
                          sd_hyp_k_simulate, sd_hyp_wk_fit, sd_hyp_wk_model, sd_hyp_wk_sim, sd_hyp_wk_simulate,
                          sd_lin_k_fit, sd_lin_k_model, sd_lin_k_sim, sd_lin_k_simulate, sd_par_k_fit, sd_par_k_model,
                          sd_par_k_sim, sd_par_k_simulate)

__all__ = ["SOCIAL_DISTS", "SOCIAL_PAYOUTS",
           "sd_hyp_wk_fit", "sd_hyp_wk_sim", "sd_hyp_wk_simulate", "sd_hyp_wk_model",
           "sd_hyp_k_fit", "sd_hyp_k_sim", "sd_hyp_k_simulate", "sd_hyp_k_model",
           "sd_par_k_fit", "sd_par_k_sim", "sd_par_k_simulate", "sd_par_k_model",
           "sd_lin_k_fit", "sd_lin_k_sim", "sd_lin_k_simulate", "sd_lin_k_model"]
