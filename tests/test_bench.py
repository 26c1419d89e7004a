"""bench.py measures speed; these tests only check that its one-call GPU check runs and reports
what it measured (the numbers themselves are never asserted)."""
import json
import os
import subprocess
import sys

import pytest

import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_gpu_check_runs_on_cpu_with_quick(tmp_path):
    r = subprocess.run([sys.executable, "bench.py", "--check", "--device", "cpu", "--quick", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["tests"]["exit"] == 0 and "passed" in check["tests"]["summary"]
    assert check["sampler"] and all(s["ours_tok_s"] > 0 and s["hf_generate_tok_s"] > 0 for s in check["sampler"])
    phases = {p["phase"] for p in check["copd_step"]["phases"]}
    assert {"forward + backward", "teacher scoring", "optimizer"} <= phases
    assert check["copd_run"]["exit"] == 0 and check["copd_run"]["how"].startswith("measured")
    assert check["nccl"] == {"skipped": "no GPU"}
    md = (tmp_path / "check.md").read_text()
    assert "| shape | batch |" in md and "| forward + backward |" in md and "NCCL, 2 ranks: no GPU" in md
    assert md.strip() in r.stdout


def test_a_copd_run_cut_at_its_budget_is_extrapolated_and_says_so(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    rows = [{"kind": "config"}] + [{"kind": "train", "model": f"copd:{d}", "step": s, "time": 2.0 * s}
                                   for s in (1, 2, 3, 4, 5) for d in ("text", "image")]
    (out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    monkeypatch.setattr(bench, "_sh", lambda cmd, timeout, env=None: ("timeout", 30.0, ""))
    got = bench.check_copd_run(str(out), "smoke", budget_s=30)
    # 5 of 2·T = 8 updates in 10 s of loop, 20 s before the loop: 20 + 8 · 2 s
    assert (got["updates_done"], got["updates_total"], got["wall_s"]) == (5, 8, 36.0)
    assert got["how"] == "extrapolated from the first 5 of 8 updates (final evaluation not included)"


@pytest.mark.parametrize("flags, message", [(["--device", "gpu0"], "not a device"),
                                            (["--micro-batch", "64,x"], "--micro-batch takes"),
                                            (["--micro-batch", "0"], "--micro-batch takes")])
def test_bad_bench_flags_are_one_line(flags, message):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), *flags], capture_output=True, text=True)
    assert r.returncode != 0 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_check_reports_pytests_summary_not_a_warning_printed_after_it():
    output = "....\n3 passed in 2.10s\n  warner(PytestBenchmarkWarning(text))"
    assert bench.pytest_summary(output) == "3 passed in 2.10s"
    assert bench.pytest_summary("F.\n1 failed, 1 passed in 0.5s") == "1 failed, 1 passed in 0.5s"
    assert bench.pytest_summary("Traceback: boom") == "Traceback: boom"      # no summary: the last line
    assert bench.pytest_summary("") == ""
