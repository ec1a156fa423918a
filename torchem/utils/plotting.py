"""pyEM's ``pyem.utils.plotting``: the figures of :mod:`torchem.plotting` (matplotlib only, no seaborn)."""
from ..plotting import plot_choices, plot_history, plot_recovery, plot_scatter

__all__ = ["plot_scatter", "plot_choices", "plot_recovery", "plot_history"]
