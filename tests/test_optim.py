import pytest
import torch

from optim import adamw, cosine, learning_rate, set_lr


def test_learning_rate_decays_from_peak_to_its_floor():
    lr = lambda t, schedule="cosine": learning_rate(1e-3, t, 101, schedule, 0.1)
    assert lr(1) == pytest.approx(1e-3)
    assert lr(51) == pytest.approx(0.55e-3)     # halfway: the midpoint of η and 0.1·η
    assert lr(101) == pytest.approx(1e-4)
    assert lr(80, "constant") == 1e-3
    assert learning_rate(1e-3, 1, 1) == 1e-3   # a one-update loop keeps η


def test_the_warm_start_decays_along_the_same_cosine(tmp_path, monkeypatch):
    import warmstart
    from test_warmstart import TINY
    seen = []
    monkeypatch.setattr(warmstart, "cosine", lambda progress, floor: seen.append((progress, floor)) or 1.0)
    monkeypatch.setenv("COPD_CACHE", str(tmp_path))
    warmstart.warm_start(TINY, warmstart.WarmStartConfig(steps=4, batch_size=3, train_examples=12), 0, quiet=True)
    assert [p for p, _ in seen][:4] == [0.0, 0.25, 0.5, 0.75] and {f for _, f in seen} == {0.1}
    assert cosine(0.0, 0.1) == 1.0 and cosine(1.0, 0.1) == pytest.approx(0.1)


def test_adamw_trains_only_what_requires_grad_and_set_lr_reaches_every_group():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)                        # a frozen base (LoRA)
    opt = adamw(model, 1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == 2
    assert opt.param_groups[0]["betas"] == (0.9, 0.99) and opt.param_groups[0]["weight_decay"] == 0.0
    set_lr([opt], 5e-4)
    assert all(g["lr"] == 5e-4 for g in opt.param_groups)
