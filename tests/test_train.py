import json
import os
import subprocess
import sys

import pytest

import train
from config import METHODS, presets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_method_all_smoke_writes_every_method(tmp_path):
    out = tmp_path / "all"
    assert train.main(["--experts", "text,image", "--method", "all", "--preset", "smoke", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    for method in ("base", "experts", "mixed", "opd", "mopd", "copd", "copd@equal"):
        assert set(results[method]) == {"text", "image", "average"}, method
        assert all(0.0 <= v <= 1.0 for v in results[method].values())
    assert {"copd:text", "copd:image", "expert:text", "opd:text->image", "opd:image->text"} <= set(results)
    assert set(results["_divergence_cost"]) == {"text", "image"}
    K, T = 2, presets()["smoke"].steps
    updates = {m: c["updates"] for m, c in results["_compute"].items()}
    assert updates["experts"] == K * T and updates["mixed"] == K * T and updates["mopd"] == K * T
    assert updates["copd:text"] == K * T and updates["copd"] == K * K * T     # each branch takes K·T
    assert updates["copd@equal:text"] == T and updates["copd@equal"] == K * T  # all branches: mixed's K·T
    taught = {m: c["teacher_tokens"] for m, c in results["_compute"].items()}
    assert taught["mixed"] == taught["experts"] == 0 and min(taught["opd"], taught["mopd"], taught["copd"]) > 0
    assert all(c["rollout_tokens"] >= c["teacher_tokens"] for c in results["_compute"].values())
    assert set(results["_wall_s"]) >= {"base", "expert:text", "mixed", "mopd", "copd"}
    assert (out / "curves.png").stat().st_size > 1000
    # the merge probes (probes.py): drift at every eval, the merged model over training, the
    # output ensemble and the interpolation at the end, the branches on disk
    for name, updates in (("copd", K * T), ("copd@equal", T)):
        probes = results["_merge_probes"][name]
        assert [step for step, _ in probes["drift"]] == list(range(0, updates + 1, presets()["smoke"].eval_every))
        assert set(probes["drift"][0][1]) == {"image~text", "text~base", "image~base"}
        assert all(v == 0 for v in probes["drift"][0][1].values()) and probes["drift"][-1][1]["image~text"] > 0
        assert set(probes["ensemble"]) == {"text", "image"}
        curve = probes["interpolation"]["image~text"]
        assert [a for a, _ in curve] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert curve[0][1]["text"] == results[f"{name}:image"]["text"] and curve[2][1] == {
            d: results[name][d] for d in ("text", "image")}
        assert sorted(os.listdir(out / f"{name}-branches")) == ["image.pt", "text.pt"]
        assert results["_wall_s"][f"probes:{name}"] >= 0
    assert "### The merge of copd (probes)" in (out / "results.md").read_text()
    md = (out / "results.md").read_text()
    assert "| copd |" in md and "Budgets" in md and "--seed 0" in md and "| optimizer updates |" in md
    assert f"η = {presets()['smoke'].lr:g}, cosine to" in md
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in rows}
    assert {"config", "train", "eval", "divergence", "drift", "probe"} <= kinds
    assert any(r["kind"] == "eval" and r["model"] == "copd" and not r["final"] for r in rows)   # merged, over training
    opd_rows = [r for r in rows if r["kind"] == "train" and r.get("phase") == "opd"]
    assert opd_rows and all("overlap_from_image" in r or "overlap_from_text" in r for r in opd_rows)
    assert any(r["kind"] == "divergence" and r["method"] == "experts" for r in rows)
    peak = presets()["smoke"].lr
    for name in ("expert:text", "mixed", "opd:text->image", "mopd", "copd:image"):
        lrs = [r["lr"] for r in rows if r["kind"] == "train" and r["model"] == name]
        assert lrs[0] == pytest.approx(peak) and lrs[-1] == pytest.approx(0.1 * peak), name
        assert all(a >= b for a, b in zip(lrs, lrs[1:])), name


def test_default_method_is_copd_and_three_experts_work(tmp_path):
    out = tmp_path / "copd3"
    assert train.main(["--experts", "text,image,video", "--preset", "smoke", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["copd"]) == {"text", "image", "video", "average"}
    assert {"copd:text", "copd:image", "copd:video"} <= set(results)
    assert "experts" not in results


def test_single_expert_rlvr(tmp_path):
    out = tmp_path / "rlvr"
    assert train.main(["--experts", "text", "--method", "rlvr", "--preset", "smoke", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"base", "rlvr"} and set(results["rlvr"]) == {"text", "average"}


def test_lr_flags_reach_the_run(tmp_path):
    out = tmp_path / "const"
    assert train.main(["--experts", "text", "--method", "rlvr", "--preset", "smoke", "--out", str(out),
                       "--lr", "3e-4", "--lr-schedule", "constant"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if r["kind"] == "train"] == [3e-4] * presets()["smoke"].steps


@pytest.mark.parametrize("args, message", [
    (["--experts", "text,audio"], "unknown domain 'audio'"),
    (["--method", "ppo"], "unknown method 'ppo'"),
    (["--experts", "text", "--method", "copd"], "needs at least two experts"),
    (["--data", "text=nope.jsonl"], "nope.jsonl: no such file"),
    (["--data", "speech=a.jsonl"], "--data expects DOMAIN=PATH"),
    (["--model", "/no/such/checkpoint"], "no such folder"),
    (["--model", "./not/here"], "no such folder"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--steps", "-5"], "--steps must be at least 1, got -5"),
    (["--ckpt-every", "-1"], "--ckpt-every must be 0 (never) or a positive number"),
    (["--max-prompt-tokens", "0"], "--max-prompt-tokens must be at least 1"),
    (["--device", "cuda"] if not __import__("torch").cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
    (["--device", "gpu0"], "not a device"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--lr-schedule", "linear"], "unknown value 'linear'"),
    (["--experts", ""], "--experts names no domain"),
    (["--experts", " , "], "--experts names no domain"),
    (["--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
    (["--seed", str(2 ** 64)], "--seed must be from 0 to 2^63 - 1"),
    (["--seed", "-1"], "--seed must be from 0 to 2^63 - 1"),
    (["--device", "mps"], "cpu or cuda (cuda:N) only"),
    (["--device", "meta"], "cpu or cuda (cuda:N) only"),
    (["--data", "video=a.jsonl"], "video is not among --experts text,image"),
    (["--data", "text=a.jsonl", "--data", "text=b.jsonl"], "--data names text twice"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_input_is_one_line_no_traceback_nothing_written(tmp_path, args, message):
    out = tmp_path / "out"
    r = run_cli("--preset", "smoke", "--out", str(out), *args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_a_folder_that_is_not_a_checkpoint_is_refused_cleanly(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "config.json").write_text("{not json")
    r = run_cli("--preset", "smoke", "--out", str(tmp_path / "o"), "--model", str(junk))
    assert r.returncode == 2 and "cannot load it" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_bad_jsonl_row_and_missing_image_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": ')
    r = run_cli("--preset", "smoke", "--out", str(tmp_path / "o1"), "--data", f"text={bad}")
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr and "Traceback" not in r.stderr
    img = tmp_path / "img.jsonl"
    img.write_text('{"prompt": "How many?", "answer": "1", "image": "gone.png"}\n')
    r = run_cli("--preset", "smoke", "--out", str(tmp_path / "o2"), "--data", f"image={img}")
    assert r.returncode == 2 and "img.jsonl:1" in r.stderr and "gone.png" in r.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_refuses_to_overwrite_another_runs_results(tmp_path):
    out = tmp_path / "done"
    out.mkdir()
    (out / "results.json").write_text("{}")
    r = run_cli("--preset", "smoke", "--out", str(out))
    assert r.returncode == 2 and "--overwrite" in r.stderr and "--resume" in r.stderr
    assert (out / "results.json").read_text() == "{}"


def test_a_saved_checkpoint_runs_through_model_flag(tiny, tmp_path):
    from policy import save_policy
    model, proc = tiny
    ckpt = tmp_path / "ckpt"
    save_policy(model, proc, str(ckpt))
    out = tmp_path / "real"
    assert train.main(["--model", str(ckpt), "--experts", "text,image", "--method", "copd", "--preset", "smoke",
                       "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["copd"]) == {"text", "image", "average"}


def test_jsonl_data_trains_and_evaluates(tmp_path):
    rows = [{"prompt": f"Compute {a}+{b}.", "answer": a + b} for a in range(5) for b in range(5)]
    data = tmp_path / "text.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "jsonl"
    assert train.main(["--experts", "text", "--method", "rlvr", "--preset", "smoke", "--data", f"text={data}",
                       "--out", str(out)]) == 0
    assert "rlvr" in json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])
def test_vl_checkpoints_run_rlvr_and_copd_through_the_cli(arch, tmp_path):
    from test_policy import tiny_vl_checkpoint
    ckpt = tiny_vl_checkpoint(arch, tmp_path / "ckpt")
    for method, experts in (("rlvr", "image"), ("copd", "text,video")):
        out = tmp_path / method
        assert train.main(["--model", ckpt, "--experts", experts, "--method", method, "--preset", "smoke",
                           "--out", str(out)]) == 0
        assert method in json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("family", list(__import__("test_policy").TEXT_FAMILIES))
def test_every_text_family_trains_a_text_expert_end_to_end(family, tmp_path, capsys):
    """π_0 = a saved checkpoint of the family: the memory plan, GRPO steps, evals, results."""
    from test_policy import save_tiny_causal_lm
    out = tmp_path / "rlvr"
    assert train.main(["--model", save_tiny_causal_lm(family, tmp_path / "ckpt"), "--experts", "text",
                       "--method", "rlvr", "--preset", "smoke", "--out", str(out)]) == 0
    assert "Memory plan" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if r["kind"] == "train"]) == presets()["smoke"].steps
    assert set(json.loads((out / "results.json").read_text())["rlvr"]) == {"text", "average"}


def test_a_text_only_model_is_refused_for_image_experts(tmp_path):
    from test_policy import save_tiny_causal_lm
    r = run_cli("--model", save_tiny_causal_lm("llama", tmp_path / "ckpt"), "--experts", "text,image",
                "--preset", "smoke", "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "text-only" in r.stderr and not (tmp_path / "bad").exists()


def test_gpt2_trains_a_lora_expert(tmp_path):
    """GPT-2's Conv1D layers (c_attn, c_proj, c_fc) get the adapters, found in the architecture."""
    pytest.importorskip("peft")
    from test_policy import save_tiny_causal_lm
    out = tmp_path / "gpt2"
    r = run_cli("--model", save_tiny_causal_lm("gpt2", tmp_path / "ckpt"), "--experts", "text", "--method", "rlvr",
                "--preset", "smoke", "--lora-rank", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| LoRA base (frozen, shared) |" in r.stdout and "rlvr" in json.loads((out / "results.json").read_text())


def test_smolvlm_image_experts_are_one_line_and_its_text_expert_trains(tmp_path):
    from test_policy import tiny_smolvlm_checkpoint
    ckpt = tiny_smolvlm_checkpoint(tmp_path / "smolvlm")
    r = run_cli("--model", ckpt, "--experts", "image", "--method", "rlvr", "--preset", "smoke",
                "--out", str(tmp_path / "img"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "idefics3 is a vision-language family" in r.stderr and "qwen2_5_vl" in r.stderr
    assert not (tmp_path / "img").exists()
    out = tmp_path / "text"
    assert train.main(["--model", ckpt, "--experts", "text", "--method", "rlvr", "--preset", "smoke",
                       "--out", str(out)]) == 0
    assert "rlvr" in json.loads((out / "results.json").read_text())


def test_repeated_non_finite_steps_stop_the_run_with_a_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "rlvr_step", lambda model, opt, proc, examples, cfg: {"skipped": True})
    out = tmp_path / "nan"
    assert train.main(["--experts", "text", "--method", "rlvr", "--preset", "smoke", "--steps", "8",
                       "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert "5 steps in a row had a non-finite loss" in err and "Traceback" not in err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("skipped", False) for r in rows) == 5


def test_the_example_files_train_every_domain(tmp_path):
    examples = os.path.join(ROOT, "examples")
    out = tmp_path / "examples"
    assert train.main(["--experts", "text,image,video", "--preset", "smoke", "--out", str(out)]
                      + [arg for d in ("text", "image", "video")
                         for arg in ("--data", f"{d}={os.path.join(examples, d + '.jsonl')}")]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["copd"]) == {"text", "image", "video", "average"}


def test_a_killed_run_resumes_to_the_same_results(tmp_path):
    """SIGKILL in CoPD's Phase II, --resume, and the results equal an uninterrupted run's."""
    import signal
    import time
    args = ["--experts", "text,image", "--method", "all", "--preset", "smoke", "--steps", "6", "--ckpt-every", "1"]
    whole = tmp_path / "whole"
    assert train.main(args + ["--out", str(whole)]) == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 300
    metrics = killed / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and '"phase": "opd"' in metrics.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists(), "the run finished before it could be killed"
    r = run_cli(*args, "--out", str(killed))
    assert r.returncode == 2 and "--resume" in r.stderr          # no silent restart over it
    assert train.main(args + ["--out", str(killed), "--resume"]) == 0
    untimed = lambda path: {k: v for k, v in json.loads(path.read_text()).items() if k != "_wall_s"}
    assert untimed(killed / "results.json") == untimed(whole / "results.json")
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    whole_rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs if r["kind"] != "config"]
    assert strip(rows) == strip(whole_rows)


KILL_ARGS = ["--experts", "text,image", "--method", "all", "--preset", "smoke", "--steps", "2", "--ckpt-every", "1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    assert train.main(KILL_ARGS + ["--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("at", [0.15, 0.5, 0.85])
def test_a_kill_at_any_point_resumes_to_the_same_results(tmp_path, uninterrupted, at):
    """SIGKILL once the log holds a share `at` of an uninterrupted run's lines (in the experts,
    in static OPD or MOPD, in CoPD), then --resume: the results and the log equal the
    uninterrupted run's, every method's."""
    import signal
    import time
    whole_rows = (uninterrupted / "metrics.jsonl").read_text().splitlines()
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *KILL_ARGS, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    metrics, deadline = killed / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= at * len(whole_rows):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists(), "the run finished before it could be killed"
    assert train.main(KILL_ARGS + ["--out", str(killed), "--resume"]) == 0
    untimed = lambda path: {k: v for k, v in json.loads(path.read_text()).items() if k != "_wall_s"}
    assert untimed(killed / "results.json") == untimed(uninterrupted / "results.json")
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k != "time"} for r in rows
                          if json.loads(r)["kind"] != "config"]
    assert strip((killed / "metrics.jsonl").read_text().splitlines()) == strip(whole_rows)


def test_memory_options_run_through_to_results(tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    r = run_cli("--experts", "text,image", "--method", "copd", "--preset", "smoke", "--out", str(out),
                "--lora-rank", "4", "--grad-ckpt", "--dtype", "bf16")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Memory plan (--method copd, 2 experts, torch.bfloat16)" in r.stdout
    assert "| LoRA base (frozen, shared) |" in r.stdout
    assert set(json.loads((out / "results.json").read_text())["copd"]) == {"text", "image", "average"}


@pytest.mark.parametrize("flag,message", [(["--dtype", "fp8"], "unknown dtype 'fp8'"),
                                          (["--lora-rank", "-2"], "--lora-rank must be 0")])
def test_bad_memory_options_are_one_line(tmp_path, flag, message):
    r = run_cli("--preset", "smoke", "--out", str(tmp_path / "x"), *flag)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_a_hub_name_goes_to_the_hub_and_offline_is_one_line(tmp_path):
    out = tmp_path / "hub"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--model", "Qwen/Qwen2.5-VL-3B-Instruct",
                        "--preset", "smoke", "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "could not fetch it from the Hugging Face Hub" in r.stderr and "--model DIR" in r.stderr
    assert not out.exists()


def test_out_that_is_a_file_or_unwritable_is_refused_before_pi0(tmp_path):
    afile = tmp_path / "f"
    afile.write_text("x")
    r = run_cli("--preset", "smoke", "--out", str(afile))
    assert r.returncode == 2 and "a file, not a folder" in r.stderr and afile.read_text() == "x"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        r = run_cli("--preset", "smoke", "--out", str(locked / "out"))
        assert r.returncode == 2 and "cannot write in" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    finally:
        locked.chmod(0o700)


def bad_data(tmp_path, rows: bytes, name="d.jsonl"):
    path = tmp_path / name
    path.write_bytes(rows)
    return path


@pytest.mark.parametrize("domain, rows, message", [
    ("image", b'{"prompt": "a", "answer": "1", "image": 5}\n', "d.jsonl:1: an image must be a file path"),
    ("text", b'{"prompt": "a", "answer": null}\n{"prompt": "b", "answer": 1}\n', "d.jsonl:1: 'answer' must be"),
    ("video", b'{"prompt": "a", "answer": "left", "video": []}\n', "d.jsonl:1: 'video' needs at least one frame"),
    ("text", b'{"prompt": "a", "answer": "1"}\n', "one row cannot be split"),
    ("text", b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "2"}\n', "d.jsonl:2: not valid UTF-8"),
])
def test_bad_data_is_one_line_naming_file_and_line(tmp_path, domain, rows, message):
    path = bad_data(tmp_path, rows)
    out = tmp_path / "o"
    r = run_cli("--preset", "smoke", "--experts", domain, "--method", "rlvr", "--out", str(out), "--data", f"{domain}={path}")
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_a_decompression_bomb_image_is_refused(tmp_path):
    import zlib
    from PIL import Image
    Image.new("RGB", (1, 1)).save(tmp_path / "bomb.png")
    data = bytearray((tmp_path / "bomb.png").read_bytes())
    data[16:24] = (40000).to_bytes(4, "big") * 2          # the IHDR header claims 40000x40000
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    (tmp_path / "bomb.png").write_bytes(bytes(data))
    path = bad_data(tmp_path, b'{"prompt": "a", "answer": "1", "image": "bomb.png"}\n')
    from tasks import DataError, load_jsonl
    with pytest.raises(DataError, match="d.jsonl:1: image '.*bomb.png' is too large"):
        load_jsonl(str(path), "image")


def test_a_prompt_over_the_context_is_refused_before_anything_is_written(tmp_path):
    big = "x" * (10 * 1024 * 1024)
    path = bad_data(tmp_path, (f'{{"prompt": "a", "answer": "1"}}\n{{"prompt": "{big}", "answer": "2"}}\n').encode())
    out = tmp_path / "o"
    r = run_cli("--preset", "smoke", "--experts", "text", "--method", "rlvr", "--out", str(out), "--data", f"text={path}")
    assert r.returncode == 2 and "d.jsonl:2: the prompt is at least" in r.stderr and "over the limit of 2038" in r.stderr
    assert not out.exists()
    path = bad_data(tmp_path, b'{"prompt": "a", "answer": "1"}\n{"prompt": "Compute 12345.", "answer": "2"}\n', "e.jsonl")
    r = run_cli("--preset", "smoke", "--experts", "text", "--method", "rlvr", "--out", str(out), "--data",
                f"text={path}", "--max-prompt-tokens", "5")
    assert r.returncode == 2 and "e.jsonl:2: the prompt is 14 tokens, over the limit of 5" in r.stderr


def test_ctrl_c_is_one_line_with_the_resume_command(tmp_path):
    import signal
    import time
    out = tmp_path / "c"
    args = ["--experts", "text", "--method", "rlvr", "--preset", "smoke", "--steps", "400", "--ckpt-every", "1",
            "--out", str(out), "--overwrite"]
    # Ctrl-C as a terminal sends it: a shell's background job (CI in `cmd &`) ignores SIGINT, and
    # a child Python inherits that and never raises KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and not list((out if out.exists() else tmp_path).glob("ckpt-*.pt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1].strip().splitlines()
    assert proc.returncode == 130 and len(err) == 1, err
    assert err[0].startswith(f"interrupted; newest checkpoint {out}/ckpt-")
    assert err[0].endswith(f"continue with: python train.py {' '.join(args[:-1])} --resume")


def test_each_stage_leaves_one_line_in_a_log_file(tmp_path):
    r = run_cli("--experts", "text,image", "--method", "mixed", "--preset", "smoke", "--out", str(tmp_path / "m"))
    assert r.returncode == 0
    kept = [line for line in r.stdout.splitlines() if " steps, " in line and "held-out greedy" in line]
    assert [line.split("] ")[1].split(":")[0] for line in kept] == ["base", "mixed"]
    assert "mixed: 8 steps" in kept[1] and "text " in kept[1] and "image " in kept[1]
    assert "it/s" not in r.stderr          # no progress bars when the output is not a terminal


@pytest.mark.parametrize("method", [m for m in METHODS if m != "all"])
def test_every_method_runs_on_its_own(tmp_path, method):
    out = tmp_path / method
    experts = "text" if METHODS[method].min_experts == 1 else "text,image"
    assert train.main(["--experts", experts, "--method", method, "--preset", "smoke", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    # both CoPD budgets, or every baseline: a row each
    rows = {"copd+equal": ("copd", "copd@equal"), "baselines": ("experts", "mixed", "opd", "mopd")}.get(method, (method,))
    for row in rows:
        assert set(results[row]) == set(experts.split(",")) | {"average"}


def test_a_second_process_on_a_folder_in_use_stops_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; sys.path.insert(0, {ROOT!r}); "
                               f"from checkpoint import hold_folder; f = hold_folder({str(out)!r}); "
                               "print('held', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run_cli("--preset", "smoke", "--experts", "text", "--method", "rlvr", "--out", str(out))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert f"is in use by process {holder.pid}" in r.stderr
        assert sorted(p.name for p in out.iterdir()) == [".lock"]          # nothing written
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock went with it, and a later run goes ahead
    r = run_cli("--preset", "smoke", "--experts", "text", "--method", "rlvr", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]


def test_an_overwrite_clears_the_earlier_results_before_it_trains(tmp_path, monkeypatch):
    out = tmp_path / "o"
    assert train.main(["--experts", "text", "--method", "rlvr", "--preset", "smoke", "--out", str(out)]) == 0
    monkeypatch.setattr(train, "STAGES", {**train.STAGES, "experts": lambda run, layout: (_ for _ in ()).throw(
        KeyboardInterrupt())})
    assert train.main(["--experts", "text", "--method", "rlvr", "--preset", "smoke", "--out", str(out),
                       "--overwrite"]) == 130
    assert not any((out / f).exists() for f in ("results.json", "results.md", "curves.png"))


def test_max_new_tokens_past_the_context_is_one_line(tmp_path):
    r = run_cli("--preset", "smoke", "--experts", "text", "--method", "rlvr", "--out", str(tmp_path / "o"),
                "--max-new-tokens", "100000")
    assert r.returncode == 2 and "--max-new-tokens 100000: the model's context holds 2048 tokens" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_a_pictures_tokens_count_against_the_context(tmp_path):
    from PIL import Image
    Image.new("RGB", (20000, 10)).save(tmp_path / "wide.png")
    path = bad_data(tmp_path, b'{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": "2", "image": "wide.png"}\n')
    out = tmp_path / "o"
    r = run_cli("--preset", "smoke", "--experts", "text,image", "--method", "copd", "--out", str(out),
                "--data", f"image={path}")
    assert r.returncode == 2 and "d.jsonl:2: the prompt is" in r.stderr and "over the limit of 2038" in r.stderr
    assert not out.exists()
