"""Invalid input across the front ends (tests/reliability/bad_input.py): rejected, one line, key and allowed values."""

from . import bad_input
from .common import assert_rows


def test_bad_input_is_rejected_with_the_key_and_the_allowed_values():
    rows = bad_input.run()
    assert len(rows) >= 30
    assert_rows(rows)
