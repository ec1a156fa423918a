"""pyEM-compatible import paths (``torchem.core.compare``)."""
