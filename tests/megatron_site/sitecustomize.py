"""Test-only start-up for Megatron subprocesses (tests/megatron_versions.py puts this folder on their PYTHONPATH).

Megatron-LM core_v0.19.0 and megatron-core 0.19.2 declare Python >= 3.12; on 3.11 the one thing their
import path needs from 3.12 is ``typing.override`` (a decorator that only marks a method), given here.
"""

import typing

if not hasattr(typing, "override"):
    from typing_extensions import override

    typing.override = override
