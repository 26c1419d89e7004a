import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from parallel import Layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--experts", "text,image", "--method", "copd", "--preset", "smoke", "--seed", "3"]


def env_one_thread():
    # one thread per process, as torchrun gives each rank: the same float results either way
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(n: int, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           "train.py", *args], cwd=REPO, env=env_one_thread(), capture_output=True, text=True,
                          timeout=timeout)


def test_layout_places_branches_then_replicas():
    at = lambda r: Layout(rank=r, world=4, domains=["text", "image"], groups=[])
    assert [(at(r).branch, at(r).replica) for r in range(4)] == [("text", 0), ("text", 1), ("image", 0), ("image", 1)]
    assert at(0).rank_of("image", 1) == 3


def test_two_ranks_give_the_single_process_results(tmp_path):
    one = subprocess.run([sys.executable, "train.py", *SMOKE, "--out", str(tmp_path / "one")], cwd=REPO,
                         env=env_one_thread(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(2, *SMOKE, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    a.pop("_wall_s"), b.pop("_wall_s")                      # the one thing a rerun does not repeat
    # the merge probes: across ranks a pair's drift and the ensemble and interpolation (which need
    # every branch in one process) are not measured; each branch's drift from π_0 is, alike
    probes_one, probes_two = a.pop("_merge_probes")["copd"], b.pop("_merge_probes")["copd"]
    assert a == b
    assert [[s, {k: v for k, v in d.items() if "base" in k}] for s, d in probes_one["drift"]] == probes_two["drift"]
    assert set(probes_two) == {"drift"} and {"ensemble", "interpolation"} <= set(probes_one)
    assert sorted(os.listdir(tmp_path / "two" / "copd-branches")) == ["image.pt", "text.pt"]
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    trained = {r["model"] for r in rows if r.get("kind") == "train"}
    assert trained == {"copd:text", "copd:image"}          # rank 0 logged both branches
    assert any("overlap_from_image" in r for r in rows)    # Phase II ran across ranks


def test_two_branches_on_four_ranks(tmp_path):
    run = torchrun(4, *SMOKE, "--out", str(tmp_path / "four"))
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "four" / "results.json").read_text())
    assert set(results["copd"]) == {"text", "image", "average"}


def test_bad_rank_count_is_one_clear_line(tmp_path):
    run = torchrun(3, *SMOKE, "--out", str(tmp_path / "three"))
    assert run.returncode != 0
    assert "3 ranks do not split evenly over 2 branches" in run.stderr
    assert not (tmp_path / "three").exists()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("how", ["dies", "stalls"])
def test_a_lost_rank_stops_the_others_with_a_clear_error(tmp_path, how):
    script = tmp_path / "peer.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {REPO!r})
        import parallel
        layout = parallel.start(["text", "image"], timeout_s=5)
        if layout.rank == 1:
            if {how!r} == "dies":
                os._exit(1)
            time.sleep(120)
        try:
            parallel.gather("hello", "a test exchange")
        except parallel.PeerError as e:
            parallel.give_up(e)
    """))
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**env_one_thread(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE, text=True))
    try:
        _, err = procs[0].communicate(timeout=90)   # a rank that hangs instead fails the test here
    finally:
        procs[1].kill()
    assert procs[0].returncode == 4, err[-2000:]
    assert "error: rank 0: lost the other ranks during a test exchange" in err
