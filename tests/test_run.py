from types import SimpleNamespace

import pytest

from run import Run, TrainingError, cosine, learning_rate


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


def guard():
    """A Run with only what check_finite reads."""
    run = Run.__new__(Run)
    run.skipped_in_a_row = {}
    return run


def test_non_finite_guard_stops_after_five_skips_in_a_row_per_model():
    run = guard()
    for step in range(1, 5):
        run.check_finite("a", step, {"skipped": True})
    run.check_finite("b", 4, {"skipped": True})          # another model counts on its own
    run.check_finite("a", 5, {"skipped": False})         # a good step resets the count
    for step in range(6, 10):
        run.check_finite("a", step, {"skipped": True})
    with pytest.raises(TrainingError, match="a: 5 steps in a row had a non-finite loss .* step 10"):
        run.check_finite("a", 10, {"skipped": True})


def test_set_lr_reaches_every_optimizer():
    import torch
    run = guard()
    run.p = SimpleNamespace(lr=1e-3, lr_schedule="cosine", min_lr_frac=0.1)
    opts = [torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]) for _ in range(2)]
    assert run.set_lr(opts, 11, 11) == pytest.approx(1e-4)
    assert all(o.param_groups[0]["lr"] == pytest.approx(1e-4) for o in opts)


def test_a_resumed_stage_keeps_counting_its_wall_time_from_the_checkpoint(tmp_path):
    """results.json's _wall_s of a stage interrupted and resumed: the seconds before the
    checkpoint count, not only those after the resume."""
    import time
    from checkpoint import save_checkpoint
    from config import load_base, parse_args, settings, validate
    out = tmp_path / "r"
    args = parse_args(["--experts", "text", "--method", "rlvr", "--preset", "smoke", "--out", str(out)])
    preset = validate(args)
    model0, proc = load_base(args, preset)
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    save_checkpoint(str(out), {"loop": "expert:text", "step": 2, "where": "expert:text step 2", "completed": ["base"],
                               "models": {}, "results": {}, "curves": {}, "divergence": {}, "skipped": {},
                               "metrics_lines": 0, "settings": settings(args, preset), "stage_seconds": 100.0})
    args.resume = True
    run = Run(args, preset, model0, proc, True, settings(args, preset))
    assert 100.0 <= time.time() - run.stage_t0 < 160.0
