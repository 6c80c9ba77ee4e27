"""Put on PYTHONPATH by tests/test_deepspeed_launch.py for the launched ranks: with ZCLIP_TEST_NO_SHM=1,
DeepSpeed's inference-only shm op is not JIT-compiled at init_distributed (docs/internals/deepspeed.md), so
launcher tests need no C++ toolchain and take seconds."""

import os
import sys

if os.environ.get("ZCLIP_TEST_NO_SHM") == "1":
    import deepspeed.comm.torch  # noqa: F401 - creates the module object patched below

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
