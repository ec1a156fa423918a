"""pyEM's ``pyem.utils.math`` names: the parameter transforms of :mod:`torchem.transforms`."""
from ..transforms import alpha2norm, beta2norm, exp2norm, identity, norm2alpha, norm2beta, norm2exp

__all__ = ["norm2alpha", "alpha2norm", "norm2beta", "beta2norm", "norm2exp", "exp2norm", "identity"]
