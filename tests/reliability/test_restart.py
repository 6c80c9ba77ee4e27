"""Kill-and-resume and the checkpoint edge cases (tests/reliability/restart.py)."""

import pytest

from . import restart
from .common import assert_rows


def test_checkpoint_edge_cases():
    assert_rows(restart.edge_cases())


@pytest.mark.slow
def test_sigkill_and_resume():
    rows = restart.kill_and_resume()
    assert len(rows) >= 3
    assert_rows(rows)
