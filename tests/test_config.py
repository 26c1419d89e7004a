import pytest

from config import METHODS, UsageError, parse_args, presets


def test_every_method_runs_its_stages():
    assert METHODS["copd"].stages == ("base", "copd") and METHODS["rlvr"].stages == ("base", "experts")
    assert METHODS["all"].stages == ("base", "experts", "mixed", "opd", "mopd", "copd", "copd@equal")


def test_a_bad_flag_is_one_line_not_the_usage_text():
    with pytest.raises(UsageError, match="unrecognized arguments: --nope"):
        parse_args(["--nope"])
    with pytest.raises(UsageError, match="--seed: invalid int value"):
        parse_args(["--seed", "x"])


def test_presets_are_fresh_values_each_call():
    """apply_flags edits a preset in place: two runs in one process must not share one."""
    first, second = presets()["cpu"], presets()["cpu"]
    first.rl.micro_batch = 1
    assert second.rl.micro_batch != 1 and first.tiny is not second.tiny


def test_a_preset_samples_room_for_the_responses_its_pi0_was_taught():
    """The cpu π_0 writes image's worked steps (32 tokens); a caller that samples with the preset's
    SamplingConfig directly must not cut them short."""
    p = presets()
    assert p["cpu"].warm.worked_steps == ("image",) and p["cpu"].rl.sampling.max_new_tokens == 32
    assert p["smoke"].warm.worked_steps == () and p["smoke"].rl.sampling.max_new_tokens == 10
