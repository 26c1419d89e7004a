import os

import torch

from policy import TinyConfig
from tasks import builtin_examples
from rollout import SamplingConfig
from warmstart import WarmStartConfig, cache_dir, warm_start

TINY = TinyConfig(hidden_size=32, num_layers=2, num_heads=1, num_kv_heads=1, intermediate_size=64,
                  vision_hidden_size=16, vision_depth=1, vision_heads=2)


def test_warm_start_is_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("COPD_CACHE", str(tmp_path))
    cfg = WarmStartConfig(steps=3, batch_size=6, train_examples=30)
    model, proc = warm_start(TINY, cfg, seed=0, quiet=True)
    saved = [d for d in os.listdir(cache_dir()) if d.startswith("pi0-")]
    assert len(saved) == 1 and not [d for d in os.listdir(cache_dir()) if d.startswith(".tmp")]
    again, _ = warm_start(TINY, cfg, seed=0, quiet=True)          # loaded, not retrained
    assert os.listdir(cache_dir()) == saved
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)
    other, _ = warm_start(TINY, cfg, seed=1, quiet=True)          # another seed, another π_0
    assert len([d for d in os.listdir(cache_dir()) if d.startswith("pi0-")]) == 2


def test_supervised_warm_start_teaches_the_answer_format(tmp_path, monkeypatch):
    monkeypatch.setenv("COPD_CACHE", str(tmp_path))
    model, proc = warm_start(TINY, WarmStartConfig(steps=150, batch_size=24, train_examples=300), seed=0, quiet=True)
    exs = builtin_examples("text", "heldout", 40, 0)
    from policy import encode_prompt
    from rollout import generate
    r = generate(model, proc, [encode_prompt(proc, e.prompt) for e in exs], 1, SamplingConfig(max_new_tokens=8),
                 greedy=True)
    assert sum(t.startswith("<answer>") and t.endswith("</answer>") for t in r.texts) >= 30
