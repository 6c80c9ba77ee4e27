"""``pytest tests/reliability --long``: the >= 500-step runs (same as ZCLIP_RELIABILITY_LONG=1).

The option is registered only when this directory is named on the command line (pytest reads
``pytest_addoption`` from initial conftests); under plain ``pytest tests`` the short mode runs.
"""

import os

from .common import LONG_ENV


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False, help="reliability suite: long runs (>= 500 steps)")


def pytest_configure(config):
    if config.getoption("--long", default=False):
        os.environ[LONG_ENV] = "1"
