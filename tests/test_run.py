from types import SimpleNamespace

import pytest

from run import Run, TrainingError


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
    run.preset = SimpleNamespace(lr=1e-3, lr_schedule="cosine", min_lr_frac=0.1)
    opts = [torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]) for _ in range(2)]
    assert run.set_lr(opts, 11, 11) == pytest.approx(1e-4)
    assert all(o.param_groups[0]["lr"] == pytest.approx(1e-4) for o in opts)


def test_a_resumed_stage_keeps_counting_its_wall_time_from_the_checkpoint(tmp_path):
    """results.json's _wall_s of a stage interrupted and resumed: the seconds before the
    checkpoint count, not only those after the resume."""
    import time
    from checkpoint import save_checkpoint
    from dataclasses import replace
    from config import parse_args, validate
    from warmstart import load_pi0
    out = tmp_path / "r"
    settings = validate(parse_args(["--experts", "text", "--method", "rlvr", "--preset", "smoke", "--out", str(out)]))
    model0, proc = load_pi0(settings, settings.torch_dtype)
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    save_checkpoint(str(out), {"loop": "expert:text", "step": 2, "where": "expert:text step 2", "completed": ["base"],
                               "models": {}, "results": {}, "curves": {}, "divergence": {}, "skipped": {},
                               "metrics_lines": 0, "settings": settings.recorded(), "stage_seconds": 100.0})
    run = Run(replace(settings, resume=True), model0, proc, True)
    assert 100.0 <= time.time() - run.stage_t0 < 160.0
