import pytest

from checkpoint import save_checkpoint
from config import UsageError, parse_args
from settings import validate


def test_cpu_preset_keeps_k_times_t_within_its_cap(tmp_path):
    steps = lambda *flags: validate(parse_args(["--out", str(tmp_path / "x"), *flags])).preset.steps
    assert steps("--experts", "text", "--method", "rlvr") == 180
    assert steps("--experts", "text,image") == 180
    assert steps("--experts", "text,image,video") == 120
    assert steps("--experts", "text,image,video", "--steps", "250") == 250   # an explicit T wins
    assert steps("--experts", "text,image,video", "--preset", "gpu") == 200


def test_flags_override_the_preset(tmp_path):
    p = validate(parse_args(["--out", str(tmp_path / "x"), "--preset", "smoke", "--max-new-tokens", "7",
                             "--micro-batch", "3", "--opd-loss", "topk", "--loss-agg", "seq", "--lr", "1e-5",
                             "--opd-beta", "0.5"])).preset
    assert (p.rl.sampling.max_new_tokens, p.rl.micro_batch, p.opd.loss, p.rl.loss_agg, p.lr, p.opd.beta) == \
        (7, 3, "topk", "seq", 1e-5, 0.5)
    with pytest.raises(UsageError, match="--opd-beta must be a number ≥ 0, got -1.0"):
        validate(parse_args(["--out", str(tmp_path / "x"), "--opd-beta", "-1"]))


def test_the_conflict_and_pull_knobs_reach_the_preset_and_the_record(tmp_path):
    settings = validate(parse_args(["--out", str(tmp_path / "x"), "--experts", "video,rename",
                                    "--rename-trade", "0.5", "--rl-opd-ratio", "0.5"]))
    assert (settings.preset.rename_trade, settings.preset.rl_opd_ratio) == (0.5, 0.5)
    assert settings.recorded()["--rename-trade"] == 0.5 and settings.recorded()["--rl-opd-ratio"] == 0.5
    default = validate(parse_args(["--out", str(tmp_path / "y")])).preset
    assert (default.rename_trade, default.rl_opd_ratio) == (1.0, 1.5)
    for flags, message in ((["--rename-trade", "1.5"], "from 0 to 1, got 1.5"),
                           (["--rename-trade", "-0.1"], "from 0 to 1, got -0.1"),
                           (["--rl-opd-ratio", "0"], "--rl-opd-ratio must be a positive number"),
                           (["--rl-opd-ratio", "nan"], "--rl-opd-ratio must be a positive number")):
        with pytest.raises(UsageError, match=message):
            validate(parse_args(["--out", str(tmp_path / "x"), *flags]))


def test_validate_writes_and_deletes_nothing(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    save_checkpoint(str(out), {"step": 1})
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(UsageError, match="already holds a run"):
        validate(parse_args(["--out", str(out)]))
    validate(parse_args(["--out", str(out), "--overwrite"]))
    assert sorted(p.name for p in out.iterdir()) == before
    validate(parse_args(["--out", str(tmp_path / "new")]))
    assert not (tmp_path / "new").exists()


def test_settings_are_a_frozen_value(tmp_path):
    import dataclasses
    args = parse_args(["--out", str(tmp_path / "x"), "--experts", "text, image", "--data", "text=a.jsonl"])
    before = vars(args).copy()
    s = validate(args)
    assert vars(args) == before                                   # the command line is not rewritten
    assert s.experts == ("text", "image") and s.data == {"text": "a.jsonl"} and s.out == str(tmp_path / "x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 3


def test_resume_compares_a_data_file_by_its_contents_not_its_path(tmp_path):
    """The same file by another path resumes; changed contents under the same path are refused."""
    import shutil
    from checkpoint import save_checkpoint
    data = tmp_path / "text.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2", "answer": "4"}\n')
    out = tmp_path / "run"
    settings = lambda path, *flags: validate(parse_args(["--experts", "text", "--method", "rlvr", "--out", str(out),
                                                         "--data", f"text={path}", *flags]))
    out.mkdir()
    save_checkpoint(str(out), {"settings": settings(data).recorded()})
    shutil.copy(data, tmp_path / "copy.jsonl")
    assert settings(tmp_path / "copy.jsonl", "--resume").resume                 # another path, same bytes
    data.write_text('{"prompt": "1+1", "answer": "3"}\n{"prompt": "2+2", "answer": "4"}\n')
    with pytest.raises(UsageError, match="--resume: .* holds a run with other settings: --data text=sha256:"):
        settings(data, "--resume")


def test_train_levels_reach_the_preset_and_only_the_training_pool(tmp_path):
    settings = validate(parse_args(["--out", str(tmp_path / "x"), "--experts", "text", "--method", "rlvr",
                                    "--preset", "smoke", "--train-levels", "3,2"]))
    assert settings.preset.train_levels == (2, 3) and settings.recorded()["--train-levels"] == "2,3"
    for bad in ("0", "5", "a", ","):
        with pytest.raises(UsageError, match="--train-levels takes comma-separated levels from 1 to 4"):
            validate(parse_args(["--out", str(tmp_path / "x"), "--train-levels", bad]))
    from tasks import load_domain
    train = load_domain("text", "train", 200, 0, 4, {}, levels=(2, 3))
    held = load_domain("text", "heldout", 200, 0, 4, {})
    assert {ex.level for ex in train} == {2, 3} and {ex.level for ex in held} == {1, 2, 3, 4}


def test_worked_steps_reach_the_warm_start_the_response_length_and_the_record(tmp_path):
    """--worked-steps D,D asks for the π_0 that writes these domains' worked steps (none: no
    domain's; the cpu preset's own: image's), and the responses get the room its steps need."""
    from checkpoint import why_not_resume
    out = str(tmp_path / "x")
    settings = validate(parse_args(["--out", out, "--worked-steps", "none"]))
    assert settings.preset.warm.worked_steps == () and settings.preset.rl.sampling.max_new_tokens == 10
    assert settings.recorded()["--worked-steps"] == ""
    both = validate(parse_args(["--out", out, "--worked-steps", "text,image"]))
    assert both.preset.warm.worked_steps == ("image", "text") and both.preset.rl.sampling.max_new_tokens == 48
    assert validate(parse_args(["--out", out, "--worked-steps", "image", "--max-new-tokens", "40"])
                    ).preset.rl.sampling.max_new_tokens == 40                  # an explicit length wins
    default = validate(parse_args(["--out", out]))
    assert default.preset.warm.worked_steps == ("image",) and default.preset.rl.sampling.max_new_tokens == 32
    assert validate(parse_args(["--out", out, "--worked-steps", "image"])).recorded() == default.recorded()
    for flags, message in ((["--worked-steps", "rename"], "rename has no worked steps"),
                           (["--worked-steps", "image", "--model", str(tmp_path)], "--model .* has none")):
        with pytest.raises(UsageError, match=message):
            validate(parse_args(["--out", out, *flags]))
    # a run recorded before the flag existed ran without worked steps: it resumes without them, not with
    older = {k: v for k, v in settings.recorded().items() if k != "--worked-steps"}
    (tmp_path / "x").mkdir()
    save_checkpoint(out, {"settings": older})
    assert why_not_resume(out, settings.recorded()) is None
    assert "--worked-steps  (now image)" in why_not_resume(out, default.recorded())
