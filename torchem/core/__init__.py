"""pyEM-compatible import paths: ``torchem.core.<module>`` holds pyEM 1.0's ``pyem.core.<module>`` names.

``em`` (``EMfit``, ``EMConfig``), ``optim`` (``OptimConfig``), ``compare``
(``ModelComparison``, ``compare_models``, ``ComparisonRow``), ``priors``,
``groupdist`` (``make_group``), ``posterior`` (``parameter_recovery``) and
``modelspec`` (``ModelSpec``), each built on torchem's own modules.
"""
