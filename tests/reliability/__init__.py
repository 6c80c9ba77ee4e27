"""The reliability suite (issue 8): cross-rank identity at scale, non-finite faults, kill-and-resume and bad
input, across the PyTorch drop-in, DeepSpeed and Megatron. Scenario modules return :class:`~.common.Row`
records; the ``test_*.py`` files assert them, ``python -m tests.reliability.report`` writes them to
``docs/reliability.md``. Short by default; ``--long`` (pytest option or report flag) or
``ZCLIP_RELIABILITY_LONG=1`` for the >= 500-step runs.
"""
