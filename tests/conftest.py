import atexit
import functools
import os
import shutil
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Under `pytest -n 2` (pytest-xdist) each worker, and every process its tests start, computes on one
# thread: two workers' spinning threads would compete for the two cores, and a test that compares a
# subprocess's run with its own must run both on as many threads (another count, another float order).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))   # 1 beside another busy job: spinning threads compete

from policy import TinyConfig, build_tiny_policy, build_tokenizer, make_processor  # noqa: E402

SMALL = TinyConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                   vision_hidden_size=16, vision_depth=1, vision_heads=2)


@functools.cache
def _tiny():
    tok = build_tokenizer()
    model = build_tiny_policy(tok, SMALL, seed=0)
    return model, make_processor(tok, model)


@pytest.fixture
def tiny():
    """A random-init tiny Qwen2.5-VL and its processor (fp32), built once for the whole test run."""
    return _tiny()


def pytest_configure(config):
    """One π_0 cache for the whole test run (keys are config hashes), never the user's."""
    cache = tempfile.mkdtemp(prefix="copd-test-cache-")
    os.environ["COPD_CACHE"] = cache
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
