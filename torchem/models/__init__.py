"""The model library, one module per family.

Every model is a batched torch likelihood ``fit_func(params (S, P), *data,
mask=None, output="nll")`` carrying its parameter names, transforms, data
inputs and simulator (``fit_func.simulate``).
"""
from . import rl

__all__ = ["rl"]
