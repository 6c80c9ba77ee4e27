"""Megatron's reliability rows (tests/reliability/megatron_runs.py)."""

import pytest

pytest.importorskip("megatron.core")

from . import megatron_runs  # noqa: E402
from .common import assert_rows  # noqa: E402


@pytest.mark.slow
def test_megatron_reliability():
    rows = megatron_runs.run()
    assert len(rows) == 10
    assert_rows(rows)
