import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))   # 1 beside another busy job: spinning threads compete

from policy import TinyConfig, build_tiny_policy, build_tokenizer, make_processor  # noqa: E402

SMALL = TinyConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                   vision_hidden_size=16, vision_depth=1, vision_heads=2)


@pytest.fixture(scope="session")
def tiny():
    """A random-init tiny Qwen2.5-VL and its processor (fp32)."""
    tok = build_tokenizer()
    model = build_tiny_policy(tok, SMALL, seed=0)
    return model, make_processor(tok, model)


@pytest.fixture(autouse=True, scope="session")
def _test_cache(tmp_path_factory):
    """One π_0 cache for the whole session (keys are config hashes), never the user's."""
    os.environ["COPD_CACHE"] = str(tmp_path_factory.mktemp("cache"))
