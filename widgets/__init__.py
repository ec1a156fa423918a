"""Jupyter widgets for torchem (``torchem.widgets``; needs ipywidgets).

- :class:`FitDashboard` -- pick a model, set the fit options, fit in the
  background with a live convergence plot, stop early, read the results.
- :class:`DataLoader` -- upload a long CSV, map its columns, preview it and
  build a validated :class:`torchem.SubjectBatch`.

The core package never imports this layer.
"""
from __future__ import annotations

from .dashboard import FitDashboard
from .data_loader import DataLoader

__all__ = ["FitDashboard", "DataLoader"]
