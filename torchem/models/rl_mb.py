"""pyEM's ``pyem.models.rl_mb``: the two-step task models of :mod:`torchem.models.twostep`.

Each model has its batched likelihood ``<name>_fit``, its simulator under
both names (``<name>_simulate``, pyEM's ``<name>_sim``) and pyEM's
``<name>_model`` bundle (:class:`~torchem.model.ModelSpec`).
"""
from __future__ import annotations

from .twostep import (hybrid_mbmf_fit, hybrid_mbmf_model, hybrid_mbmf_sim, hybrid_mbmf_simulate, model_based_fit,
                      model_based_model, model_based_sim, model_based_simulate, sarsa_lambda_fit, sarsa_lambda_model,
                      sarsa_lambda_sim, sarsa_lambda_simulate)

__all__ = ["hybrid_mbmf_fit", "hybrid_mbmf_sim", "hybrid_mbmf_simulate", "hybrid_mbmf_model",
           "model_based_fit", "model_based_sim", "model_based_simulate", "model_based_model",
           "sarsa_lambda_fit", "sarsa_lambda_sim", "sarsa_lambda_simulate", "sarsa_lambda_model"]
