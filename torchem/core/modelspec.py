"""pyEM's ``pyem.core.modelspec``: the :class:`~torchem.model.ModelSpec` bundle of a model."""
from ..model import ModelSpec

__all__ = ["ModelSpec"]
