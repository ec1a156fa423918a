"""pyEM's ``pyem.core.posterior``: :func:`~torchem.recovery.parameter_recovery` and its result."""
from ..recovery import RecoveryResult, parameter_recovery

__all__ = ["parameter_recovery", "RecoveryResult"]
