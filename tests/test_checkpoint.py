import os
import random

import pytest
import torch

import checkpoint
from checkpoint import list_checkpoints, load_latest, rng_state, save_checkpoint, set_rng_state


def test_an_interrupted_write_leaves_the_previous_checkpoint_in_place(tmp_path, monkeypatch):
    first = save_checkpoint(str(tmp_path), {"step": 1, "weights": torch.ones(3)})

    def dies_half_way(obj, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt   # killed mid-write
    monkeypatch.setattr(checkpoint.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(tmp_path), {"step": 2, "weights": torch.zeros(3)})
    assert list_checkpoints(str(tmp_path)) == [first]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    path, snap, unreadable = load_latest(str(tmp_path))
    assert path == first and unreadable == [] and snap["step"] == 1 and torch.equal(snap["weights"], torch.ones(3))


def test_only_the_newest_two_are_kept(tmp_path):
    for step in range(5):
        save_checkpoint(str(tmp_path), {"step": step})
    kept = list_checkpoints(str(tmp_path))
    assert [os.path.basename(p) for p in kept] == ["ckpt-00004.pt", "ckpt-00005.pt"]
    assert load_latest(str(tmp_path))[1]["step"] == 4


def test_rng_state_round_trip():
    rng = random.Random(0)
    state = rng_state(rng)
    a = (rng.random(), random.random(), torch.rand(3))
    set_rng_state(rng, state)
    b = (rng.random(), random.random(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_a_truncated_newest_checkpoint_gives_way_to_the_older_one(tmp_path):
    from checkpoint import recorded
    older = save_checkpoint(str(tmp_path), {"step": 1, "settings": {"--seed": 0}})
    newest = save_checkpoint(str(tmp_path), {"step": 2, "weights": torch.ones(1000), "settings": {"--seed": 0}})
    with open(newest, "r+b") as f:      # a copy cut short
        f.truncate(os.path.getsize(newest) // 2)
    path, snap, unreadable = load_latest(str(tmp_path))
    assert (path, snap["step"], unreadable) == (older, 1, [newest])
    assert recorded(str(tmp_path), "settings") == {"--seed": 0}


def test_a_resume_under_other_settings_is_one_line_naming_the_flags(tmp_path):
    """Train, then resume with another --seed and other --experts: refused before any work."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["--method", "copd", "--preset", "smoke", "--steps", "1", "--ckpt-every", "1", "--out", str(tmp_path / "r")]
    run = lambda *extra: subprocess.run([sys.executable, "train.py", *args, *extra], cwd=root, capture_output=True,
                                        text=True)
    assert run("--experts", "text,image").returncode == 0
    before = sorted(os.listdir(tmp_path / "r"))
    r = run("--experts", "text,image,video", "--seed", "5", "--resume")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "--experts text,image (now text,image,video)" in r.stderr and "--seed 0 (now 5)" in r.stderr
    assert sorted(os.listdir(tmp_path / "r")) == before


def test_resume_checks_a_folder_without_checkpoints_and_never_replaces_a_finished_run(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "r"
    run = lambda *extra: subprocess.run([sys.executable, "train.py", "--method", "copd", "--preset", "smoke",
                                         "--out", str(out), *extra], cwd=root, capture_output=True, text=True)
    assert run("--seed", "3").returncode == 0 and not list(out.glob("ckpt-*.pt"))   # too short to checkpoint
    before = (out / "results.json").read_bytes()
    r = run("--seed", "4", "--resume")
    assert r.returncode == 2 and "--seed 3 (now 4)" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run("--seed", "3", "--resume")
    assert r.returncode == 2 and "holds a finished run" in r.stderr
    assert (out / "results.json").read_bytes() == before


def test_a_resume_whose_log_was_deleted_or_cut_short_is_refused_in_one_line(tmp_path):
    """The checkpoint accounts for N lines of metrics.jsonl: with fewer, a resumed run's compute
    and curves would be wrong, so --resume names the file and stops, touching nothing."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "r"
    run = lambda *extra: subprocess.run([sys.executable, "train.py", "--method", "copd", "--preset", "smoke",
                                         "--steps", "2", "--ckpt-every", "1", "--out", str(out), *extra],
                                        cwd=root, capture_output=True, text=True)
    assert run().returncode == 0
    (out / "results.json").unlink()                       # as if killed after its last checkpoint
    log = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(log[:3]))
    before = sorted(os.listdir(out))
    r = run("--resume")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "metrics.jsonl holds 3 lines, but the newest checkpoint accounts for" in r.stderr
    (out / "metrics.jsonl").unlink()
    r = run("--resume")
    assert r.returncode == 2 and "metrics.jsonl is missing" in r.stderr
    assert sorted(os.listdir(out)) == [p for p in before if p != "metrics.jsonl"]
    (out / "metrics.jsonl").write_text("".join(log))      # the whole log back: the resume goes on
    assert run("--resume").returncode == 0 and (out / "results.json").exists()
