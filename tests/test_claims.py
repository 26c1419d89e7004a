import json

import pytest

from claims import claim_differences, claims_table, holm, p_value, t_interval, two_sided_p
from report import load_runs


def test_t_interval_matches_the_textbook():
    mean, low, high = t_interval([1.0, 2.0, 3.0])          # s = 1, n = 3, t(0.975, 2) = 4.303
    assert mean == 2.0 and abs(high - mean - 4.303 / 3 ** 0.5) < 1e-9 and abs(mean - low - 4.303 / 3 ** 0.5) < 1e-9


def fake_claims_runs(tmp_path, seeds=range(5), replications=1):
    """Fake seeds: CoPD beats mixed by 5 points (± 0.5), loses to MOPD by 3, ties one static-OPD
    direction within noise and beats the other, and its branches overlap 4 points more than the
    experts do on the same pair at T updates."""
    import random
    rng = random.Random(0)
    folders = []
    for seed in seeds:
        for rep in range(replications):
            acc = lambda centre: round(centre + rng.uniform(-0.005, 0.005), 4)
            copd = acc(0.50)
            results = {"base": {"text": 0.4, "image": 0.4, "average": 0.4},
                       "mixed": {"text": 0.45, "image": 0.45, "average": copd - 0.05 + rng.uniform(-0.005, 0.005)},
                       "mopd": {"text": 0.53, "image": 0.53, "average": copd + 0.03},
                       "opd:image->text": {"text": 0.5, "image": 0.5, "average": copd + rng.choice([-0.04, 0.04])},
                       "opd:text->image": {"text": 0.4, "image": 0.4, "average": copd - 0.1},
                       "copd": {"text": copd, "image": copd, "average": copd},
                       "copd:text": {"text": copd + 0.02, "image": 0.3, "average": 0.4},
                       "copd:image": {"text": 0.3, "image": copd + 0.02, "average": 0.41},
                       "expert:text": {"text": copd - 0.1, "image": 0.4, "average": 0.4},
                       "expert:image": {"text": 0.4, "image": copd + 0.1, "average": 0.4}}
            rows = [{"kind": "config", "settings": {"seed": seed}},
                    {"kind": "divergence", "method": "copd@equal", "pair": "image~text", "step": 10, "overlap": 0.5},
                    {"kind": "divergence", "method": "copd@equal", "pair": "image~text", "step": 20, "overlap": 0.90},
                    {"kind": "divergence", "method": "copd@equal", "pair": "text~base", "step": 20, "overlap": 0.1},
                    {"kind": "divergence", "method": "copd", "pair": "image~text", "step": 40, "overlap": 0.2},
                    {"kind": "divergence", "method": "experts", "pair": "image~text", "step": 20, "overlap": 0.86}]
            folder = tmp_path / f"s{seed}-{rep}"
            folder.mkdir()
            (folder / "results.json").write_text(json.dumps(results))
            (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
            folders.append(str(folder))
    return folders


def test_claims_find_a_known_difference_in_fake_runs(tmp_path):
    runs = load_runs(fake_claims_runs(tmp_path))
    diffs = claim_differences(runs)
    assert all(abs(d - 5.0) < 1.0 for d in diffs["CoPD > mixed RLVR"])
    # copd@equal's last step against the experts', on the same pair; π_0 pairs and copd (K·T updates) left out
    assert all(abs(d - 4.0) < 1e-6 for d in diffs["overlap: CoPD branches > experts, same pairs at T updates"])
    table = claims_table(runs).splitlines()
    verdicts = {line.split(" | ")[0][2:]: (line.split(" | ")[5], line.split(" | ")[-1].rstrip(" |")) for line in table[2:]}
    assert verdicts["CoPD > mixed RLVR"] == ("holds", "holds") and verdicts["CoPD > MOPD"] == ("fails", "fails")
    assert verdicts["CoPD > static OPD image->text"][0] == "undecided"      # each direction a claim of its own
    assert verdicts["CoPD > static OPD text->image"] == ("holds", "holds")
    assert verdicts["CoPD > the text expert on text"] == ("holds", "holds")  # "A > B", never "level"
    assert verdicts["CoPD > the image expert on image"] == ("fails", "fails")
    assert verdicts["merging adds: CoPD > its text branch on text"] == ("fails", "fails")
    assert verdicts["merging adds: CoPD > its best branch, average"] == ("holds", "holds")
    assert "CoPD > static OPD" not in verdicts and "CoPD at mixed RLVR's updates > mixed RLVR" not in verdicts


def test_holm_keeps_a_claim_that_passes_alone_but_not_among_many():
    assert abs(two_sided_p(2.776, 4) - 0.05) < 1e-3 and abs(two_sided_p(12.706, 1) - 0.05) < 1e-3
    assert abs(two_sided_p(2.571, 5) - 0.05) < 1e-3 and two_sided_p(0.0, 4) == 1.0
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == {"a": 0.03, "c": 0.06, "b": 0.06}
    diffs = [1.0, 2.0, 1.5, 0.4, 2.2]                           # p ≈ 0.02 alone
    assert p_value(diffs) < 0.05 and holm({"x": p_value(diffs), **{f"y{i}": 0.5 for i in range(7)}})["x"] > 0.05


def test_replications_of_a_seed_are_pooled_into_one_seed(tmp_path):
    pooled = claim_differences(load_runs(fake_claims_runs(tmp_path, seeds=range(3), replications=2)))
    assert all(len(d) == 3 for d in pooled.values())


def test_a_paired_difference_is_paired_over_the_same_problems():
    from claims import paired_difference
    assert paired_difference("1111", "1111") == (0.0, 0.0)       # same answers: no noise at all
    mean, two_se = paired_difference("0111", "1100")              # differences −1, 0, +1, +1
    assert mean == pytest.approx(25.0) and two_se == pytest.approx(200 * (0.9166667 ** 0.5) / 2)
    with pytest.raises(ValueError, match="same problems"):
        paired_difference("01", "011")
