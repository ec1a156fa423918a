"""pyEM's ``pyem.core.compare`` name for :class:`torchem.compare.ModelComparison`."""
from ..compare import ModelComparison

__all__ = ["ModelComparison"]
