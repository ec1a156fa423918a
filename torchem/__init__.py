"""torchem: hierarchical EM with MAP estimation for many subjects at once, in PyTorch.

The core (``torchem``) never imports the Jupyter widget layer (``torchem.widgets``).
"""
from __future__ import annotations

from .api import EMModel
from .compare import ModelComparison
from .data import SubjectBatch
from .em import FitResult, IterationState, run_em
from .model import Model, model_spec
from .optim import minimize
from .transforms import (alpha2norm, beta2norm, corr2norm, exp2norm, identity, norm2alpha, norm2beta, norm2corr,
                         norm2exp)

__version__ = "0.1.0"

__all__ = [
    "EMModel",
    "ModelComparison",
    "SubjectBatch",
    "FitResult",
    "IterationState",
    "run_em",
    "Model",
    "model_spec",
    "minimize",
    "norm2alpha",
    "alpha2norm",
    "norm2beta",
    "beta2norm",
    "norm2exp",
    "exp2norm",
    "norm2corr",
    "corr2norm",
    "identity",
]
