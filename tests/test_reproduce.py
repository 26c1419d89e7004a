import gzip
import json
import os
import sys

import pytest

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
    # each run ran as two parts in two lanes, then joined: the `--method all` run, bit for bit but the clocks
    whole = tmp_path / "whole"
    _, code = reproduce.one_thread(reproduce.command("text,image", 0, str(whole), "smoke", ["--steps", "2"]),
                                   str(tmp_path / "whole.log"))
    joined = runs / "text+image-s0"
    assert code == 0 and not list(runs.glob("*.copd*")) and not list(runs.glob("*.baselines*"))
    clockless = lambda results: {k: v for k, v in results.items() if k != "_wall_s"}
    assert clockless(json.loads((joined / "results.json").read_text())) == \
        clockless(json.loads((whole / "results.json").read_text()))
    logged = lambda run: [{k: v for k, v in json.loads(line).items() if k != "time"}
                          for line in (run / "metrics.jsonl").read_text().splitlines() if '"config"' not in line]
    assert logged(joined) == logged(whole)
    assert sorted(p.name for p in joined.glob("*-branches")) == ["copd-branches", "copd@equal-branches"]
    log = (runs / "text+image-s0.log").read_text()
    assert "--method copd+equal" in log and "--method baselines" in log
    finished = {p: os.path.getmtime(runs / p / "results.json") for p in ("text+image-s0", "text+image-s1")}
    capsys.readouterr()
    assert reproduce.main(argv) == 0                      # again: nothing reruns
    assert capsys.readouterr().out.count(": kept") == 2
    assert finished == {p: os.path.getmtime(runs / p / "results.json") for p in finished}
    # a finished run of another π_0 (an older recipe) is never kept as this one's: refused, named, untouched
    results = runs / "text+image-s1" / "results.json"
    older = json.loads(results.read_text())
    assert older["_pi0"].startswith("pi0-")
    own_pi0, older["_pi0"] = older["_pi0"], "pi0-000000000000"
    results.write_text(json.dumps(older))
    capsys.readouterr()
    assert reproduce.main(argv) == 2
    err = capsys.readouterr().err
    assert "started from another π_0" in err and "text+image-s1" in err and "text+image-s0" not in err
    assert json.loads(results.read_text())["_pi0"] == "pi0-000000000000"
    # nor a finished run of another T (the preset's T moved): refused, with the T of each
    older["_pi0"] = own_pi0
    results.write_text(json.dumps(older))
    steps = argv.index("--steps") + 1
    assert reproduce.main(argv[:steps] + ["3"] + argv[steps + 1:]) == 2
    err = capsys.readouterr().err
    assert "trained another T" in err and "text+image-s0 (T = 2)" in err and "text+image-s1 (T = 2)" in err
    # T is read from the log's config row, gzipped or not (the runs kept in docs/runs are)
    metrics = runs / "text+image-s0" / "metrics.jsonl"
    with gzip.open(str(metrics) + ".gz", "wt") as f:
        f.write(metrics.read_text())
    metrics.unlink()
    assert reproduce.stored_steps(str(runs / "text+image-s0")) == 2


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


def test_bad_folders_settings_and_studies_are_one_line_before_any_run(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    cases = [(["--docs", str(tmp_path / "file")], "--docs"), (["--runs", str(tmp_path / "file" / "runs")], "is a file"),
             (["--settings", 'video,rename --rename-trade "0.5'], "No closing quotation"),
             (["--settings", "text,image --seed 3"], "reproduce.py sets these for every run"),
             (["--settings", "text,image --bogus 1"], "unrecognized arguments: --bogus"),
             (["--settings", "text,image --rename-trade 2"], "from 0 to 1"),
             (["--settings", "text,imagex"], "unknown domain or method imagex"),
             (["--settings", ";"], "names no setting"), (["--study", "dose"], "--study must be one of")]
    for flags, message in cases:
        assert reproduce.main([*flags, "--runs", str(tmp_path / "runs")] if "--runs" not in flags else flags) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (flags, err)
    assert not (tmp_path / "runs").exists()


def test_a_setting_carries_its_flags_into_its_folder_name_and_command():
    assert reproduce.folder_name("video,rename --rename-trade 0.5") == "video+rename_rename-trade=0.5"
    assert reproduce.folder_name("video,rename --method copd+equal --opd-beta 4") == \
        "video+rename_method=copd+equal_opd-beta=4"
    cmd = reproduce.command("video,rename --method copd+equal", 2, "out", "cpu", [])
    assert cmd[cmd.index("--experts") + 1] == "video,rename" and cmd[-2:] == ["--method", "copd+equal"]
    assert cmd.index("--method") < len(cmd) - 2                       # train.py takes the last --method


def test_the_conflict_study_runs_and_reports_its_dose_response(tmp_path, monkeypatch):
    """Three levels of conflict, one seed each (smoke): each setting's report and the study's,
    with the dose-response table, the predictions' slopes and the probes' plot, beside the runs."""
    monkeypatch.setenv("COPD_CACHE", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    assert reproduce.main(["--study", "conflict", "--seeds", "0", "--preset", "smoke", "--steps", "1",
                           "--runs", str(runs)]) == 0
    assert sorted(p.name for p in runs.glob("video+rename_rename-trade=*-s0")) == [
        "video+rename_rename-trade=0-s0", "video+rename_rename-trade=0.5-s0", "video+rename_rename-trade=1-s0"]
    study = (runs / "study-conflict.md").read_text()
    assert "| measure | p = 0 | p = 0.5 | p = 1 | slope over p |" in study
    assert "| mixed − expert on video falls with p |" in study and "| CoPD − mixed RLVR rises with p |" in study
    assert "| CoPD: ensemble − merged |" in study and (runs / "study-conflict.png").stat().st_size > 1000
    assert (runs / "reproduction-video+rename_rename-trade=0.5.md").exists()


def test_a_run_is_two_jobs_only_where_both_can_run_at_once(tmp_path):
    out = str(tmp_path / "text+image-s0")
    assert reproduce.jobs_of("text,image", out, 2) == [(out + ".copd", "copd+equal"), (out + ".baselines", "baselines")]
    assert reproduce.jobs_of("text,image", out, 1) == [(out, "all")]                    # one lane: parts gain nothing
    assert reproduce.jobs_of("video,rename --method copd+equal", out, 2) == [(out, "all")]   # the setting's own method
    os.makedirs(out)
    open(os.path.join(out, "results.json"), "w").close()
    assert reproduce.jobs_of("text,image", out, 2) == [(out, "all")]                    # finished: kept whole


def test_parts_of_two_runs_are_never_joined(tmp_path):
    """Parts whose π_0 evaluations differ (another seed, another π_0) are refused, named, kept."""
    out = str(tmp_path / "text+image-s0")
    for part, accuracy in (("baselines", 0.5), ("copd", 0.25)):
        folder = tmp_path / f"text+image-s0.{part}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"base": {"text": accuracy, "image": 0.5}, "_pi0": "pi0-x"}))
        (folder / "metrics.jsonl").write_text(json.dumps({"kind": "config", "recorded": {"--seed": 0}}) + "\n")
    with pytest.raises(ValueError, match="are not parts of one run"):
        reproduce.join_parts(out)
    assert not os.path.exists(out) and os.path.isdir(out + ".copd")
