import os
import sys

import reproduce


def test_one_command_runs_every_seed_reports_and_keeps_finished_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COPD_CACHE", str(tmp_path / "cache"))      # no π_0 built yet, whatever ran before
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    argv = ["--settings", "text,image", "--seeds", "0,1", "--preset", "smoke", "--steps", "2", "--lanes", "2",
            "--runs", str(runs), "--docs", str(docs)]
    assert reproduce.main(argv) == 0
    # each seed's π_0 was built by a job of its own, before the runs that share it
    for seed in (0, 1):
        assert "π_0: warm start" in (runs / f"pi0-s{seed}.log").read_text()
        assert "π_0: warm start" not in (runs / f"text+image-s{seed}.log").read_text()
    report = (docs / "reproduction-text+image.md").read_text()
    assert "| claim |" in report and "CoPD > mixed RLVR" in report and "| optimizer updates |" in report
    assert "| copd@equal |" in report and (docs / "reproduction-text+image.png").stat().st_size > 1000
    finished = {p: os.path.getmtime(runs / p / "results.json") for p in ("text+image-s0", "text+image-s1")}
    capsys.readouterr()
    assert reproduce.main(argv) == 0                      # again: nothing reruns
    assert capsys.readouterr().out.count(": kept") == 2
    assert finished == {p: os.path.getmtime(runs / p / "results.json") for p in finished}


def test_an_interrupted_run_resumes_and_a_run_killed_before_its_checkpoint_starts_over(tmp_path):
    out = tmp_path / "run"
    fresh = reproduce.command("text,image", 0, str(out), "cpu", [])
    assert "--resume" not in fresh and "--overwrite" not in fresh
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    assert reproduce.command("text,image", 0, str(out), "cpu", [])[-1] == "--overwrite"
    (out / "ckpt-00050.pt").write_bytes(b"x")
    assert reproduce.command("text,image", 0, str(out), "cpu", [])[-1] == "--resume"


def test_bad_seeds_are_one_line(capsys):
    assert reproduce.main(["--seeds", "0,x"]) == 2
    assert capsys.readouterr().err.strip() == "error: --seeds takes comma-separated integers, got '0,x'"


def test_an_unknown_preset_is_one_line(capsys):
    assert reproduce.main(["--preset", "tpu"]) == 2
    assert capsys.readouterr().err.strip() == "error: --preset must be one of smoke, cpu, gpu, got 'tpu'"


def test_a_lane_runs_one_thread_and_keeps_freed_memory_unless_the_user_says_otherwise(tmp_path, monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    log = tmp_path / "lane.log"
    show = "import os; print(*(os.environ.get(k) for k in ('OMP_NUM_THREADS', 'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_')))"
    _, code = reproduce.one_thread([sys.executable, "-c", show], str(log))
    assert code == 0 and log.read_text().split() == ["1", str(32 << 20), "12345"]


def test_a_repeated_seed_or_setting_is_refused(tmp_path, capsys):
    for flags in (["--seeds", "0,0"], ["--settings", "text,image;text,image"], ["--steps", "0"]):
        assert reproduce.main([*flags, "--runs", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs")]) == 2
        assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
