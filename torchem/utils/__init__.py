"""pyEM-compatible import paths: ``torchem.utils.math``, ``torchem.utils.stats``, ``torchem.utils.plotting``.

Each module holds pyEM 1.0's names with pyEM's signatures, built on
torchem's own modules (:mod:`torchem.transforms`, :mod:`torchem.evidence`,
:mod:`torchem.plotting`).
"""
