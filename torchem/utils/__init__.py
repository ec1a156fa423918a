"""pyEM-compatible import paths (``torchem.utils.math``, ``torchem.utils.plotting``)."""
