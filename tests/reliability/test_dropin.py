"""The drop-in's reliability rows (tests/reliability/dropin.py): identity, non-finite, raise, mismatch."""

import pytest

from . import dropin
from .common import assert_rows


@pytest.mark.slow
def test_dropin_reliability():
    rows = dropin.run()
    assert len(rows) == 13
    assert_rows(rows)
