"""pyEM's ``pyem.utils.plotting`` names: the figures of :mod:`torchem.plotting`."""
from ..plotting import plot_history, plot_recovery, plot_scatter

__all__ = ["plot_scatter", "plot_recovery", "plot_history"]
