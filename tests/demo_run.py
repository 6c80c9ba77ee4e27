"""One short demo run per test session, shared by test_demo and test_replay (it is the slow part)."""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Any


@functools.lru_cache(maxsize=None)
def short_demo() -> dict[str, Any]:
    """``zclip-dist demo --short`` in a temporary folder: 4 gloo ranks, real DeepSpeed engines."""
    from zclip_dist import demo

    out = tempfile.mkdtemp(prefix="zclip_demo_")
    settings = demo.DemoSettings(**demo.SHORT, out=os.path.join(out, "demo"), progress=False)
    result = demo.run(settings)
    return {**result, "settings": settings}
