"""DeepSpeed's reliability rows (tests/reliability/deepspeed_runs.py)."""

import pytest

pytest.importorskip("deepspeed")

from . import deepspeed_runs  # noqa: E402
from .common import assert_rows  # noqa: E402


@pytest.mark.slow
def test_deepspeed_reliability():
    rows = deepspeed_runs.run()
    assert len(rows) == 12
    assert_rows(rows)
