import json
from types import SimpleNamespace

from report import results_table, write_results


def fake_run(tmp_path):
    args = SimpleNamespace(out=str(tmp_path), method="all", preset="smoke", seed=3, model=None)
    return SimpleNamespace(
        args=args, domains=["text", "image"], p=SimpleNamespace(steps=10), heldout={"text": [0] * 50, "image": [0] * 50},
        results={"base": {"text": 0.5, "image": 0.6, "average": 0.55},
                 "experts": {"text": 0.7, "image": 0.8, "average": 0.75},
                 "mixed": {"text": 0.6, "image": 0.9, "average": 0.75},
                 "copd": {"text": 0.75, "image": 0.85, "average": 0.8}},
        curves={"copd:text": [(0, {"text": 0.5, "image": 0.6}), (5, {"text": 0.6, "image": 0.6})]},
        divergence={"copd": {"image~text": [(5, {"overlap": 0.9, "sym_kl": 0.1})]}})


def test_results_files_hold_the_table_budgets_and_divergence_cost(tmp_path):
    run = fake_run(tmp_path)
    write_results(run)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["_divergence_cost"] == {"text": -0.1, "image": 0.1}       # mixed − expert
    md = (tmp_path / "results.md").read_text()
    assert "--seed 3" in md and "| copd | 75.0 | 85.0 | 80.0 |" in md
    assert "- mixed: 20 GRPO steps on the union" in md and "- opd:" not in md   # only methods that ran
    assert "Divergence cost (mixed − expert, points): text -10.0, image +10.0" in md
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_table_has_a_row_per_model_and_skips_private_keys(tmp_path):
    run = fake_run(tmp_path)
    run.results["_sampled"] = {"base": {"text": 0.1}}
    lines = results_table(run).splitlines()
    assert lines[0] == "| model | text | image | average |" and len(lines) == 2 + 4
