"""pyEM's ``pyem.models.rl_mf``: the model-free bandit models of :mod:`torchem.models.rl`.

Each model has its batched likelihood ``<name>_fit`` (torchem's contract:
``params`` ``(S, P)``, subjects first), its simulator under both names
(``<name>_simulate``, pyEM's ``<name>_sim``) and pyEM's ``<name>_model``
bundle (:class:`~torchem.model.ModelSpec`).
"""
from __future__ import annotations

from .rl import (rw1a1b_fit, rw1a1b_model, rw1a1b_sim, rw1a1b_simulate, rw2a1b_fit, rw2a1b_model, rw2a1b_sim,
                 rw2a1b_simulate, rw3a1b_fit, rw3a1b_model, rw3a1b_sim, rw3a1b_simulate, rw4a1b_fit, rw4a1b_model,
                 rw4a1b_sim, rw4a1b_simulate)

__all__ = ["rw1a1b_fit", "rw1a1b_sim", "rw1a1b_simulate", "rw1a1b_model",
           "rw2a1b_fit", "rw2a1b_sim", "rw2a1b_simulate", "rw2a1b_model",
           "rw3a1b_fit", "rw3a1b_sim", "rw3a1b_simulate", "rw3a1b_model",
           "rw4a1b_fit", "rw4a1b_sim", "rw4a1b_simulate", "rw4a1b_model"]
