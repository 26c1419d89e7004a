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
    from config import parse_args
    from settings import validate
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


def test_results_say_which_machine_computed_them_once_per_machine(tmp_path, monkeypatch):
    """results.json `_machine`: the CPU's vector unit (or the GPU), threads and versions; a run
    resumed on the same machine adds nothing, one resumed on another adds that machine."""
    import run as run_module
    from checkpoint import save_checkpoint
    from dataclasses import replace
    from config import parse_args
    from settings import validate
    from warmstart import load_pi0
    out = tmp_path / "r"
    settings = validate(parse_args(["--experts", "text", "--method", "rlvr", "--preset", "smoke", "--out", str(out)]))
    model0, proc = load_pi0(settings, settings.torch_dtype)
    out.mkdir()
    here = run_module.machine("cpu")
    assert "CPU" in here and "torch" in here and "transformers" in here
    assert Run(settings, model0, proc, True).results["_machine"] == [here]
    for earlier in ([here], ["another machine"]):
        save_checkpoint(str(out), {"loop": "expert:text", "step": 2, "where": "expert:text step 2", "completed": ["base"],
                                   "models": {}, "results": {"_machine": earlier}, "curves": {}, "divergence": {},
                                   "skipped": {}, "metrics_lines": 0, "settings": settings.recorded()})
        resumed = Run(replace(settings, resume=True), model0, proc, True)
        assert resumed.results["_machine"] == (earlier if earlier == [here] else earlier + [here])


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """The disk fills at the third checkpoint (torch's writer raises RuntimeError), then while
    writing metrics.jsonl (OSError ENOSPC), then at curves.png: each time one line naming OUT,
    exit 3, no half-written file, and the run resumes from the last complete checkpoint."""
    import errno
    import checkpoint
    import report
    import train
    out = tmp_path / "full"
    args = ["--experts", "text,image", "--method", "copd", "--preset", "smoke", "--steps", "2", "--ckpt-every", "1",
            "--out", str(out)]
    real_save, saves = checkpoint.torch.save, []

    def save(obj, path, *a, **k):
        saves.append(path)
        if len(saves) == 3:
            raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing "
                               "file data/3: file write failed")
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(checkpoint.torch, "save", save)
    assert train.main(args) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: could not write a checkpoint in {out}: no space left on its device; the last complete "
                   "checkpoint is kept: free space, then --resume"]
    assert [p.name for p in sorted(out.glob("ckpt-*"))] == ["ckpt-00001.pt", "ckpt-00002.pt"]
    monkeypatch.setattr(checkpoint.torch, "save", real_save)

    import run as run_module
    real_log, calls = run_module.Run.log, []

    def log(self, **row):
        calls.append(1)
        if len(calls) == 4:
            self.log_file.write = lambda text: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        return real_log(self, **row)
    monkeypatch.setattr(run_module.Run, "log", log)
    assert train.main(args + ["--resume"]) == 3
    assert "could not write metrics.jsonl in" in capsys.readouterr().err
    monkeypatch.setattr(run_module.Run, "log", real_log)

    real_figure = report._save_figure
    monkeypatch.setattr(report, "_save_figure", lambda fig, path: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    assert train.main(args + ["--resume"]) == 3
    assert "could not write the results in" in capsys.readouterr().err and not list(out.glob("*.tmp*"))
    monkeypatch.setattr(report, "_save_figure", real_figure)
    assert train.main(args + ["--resume"]) == 0 and (out / "results.json").exists()
