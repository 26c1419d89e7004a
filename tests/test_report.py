import json
import os

import pytest

from report import budgets, describe_lr, results_table, write_results


RESULTS = {"base": {"text": 0.5, "image": 0.6, "average": 0.55},
           "experts": {"text": 0.7, "image": 0.8, "average": 0.75},
           "mixed": {"text": 0.6, "image": 0.9, "average": 0.75},
           "copd": {"text": 0.75, "image": 0.85, "average": 0.8}}


def write_fake(tmp_path, results):
    write_results(str(tmp_path), results, ["text", "image"],
                  curves={"copd:text": [(0, {"text": 0.5, "image": 0.6}), (5, {"text": 0.6, "image": 0.6})]},
                  divergence={"copd": {"image~text": [(5, {"overlap": 0.9, "sym_kl": 0.1})]}},
                  title="--experts text,image --method all --preset smoke --seed 3", eval_size=50,
                  budget=budgets(2, 10, None), learning_rate=describe_lr(1e-3, "constant", 0.1))


def test_results_files_hold_the_table_budgets_and_divergence_cost(tmp_path):
    write_fake(tmp_path, dict(RESULTS))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["_divergence_cost"] == {"text": -0.1, "image": 0.1}       # mixed − expert
    md = (tmp_path / "results.md").read_text()
    assert "--seed 3" in md and "| copd | 75.0 | 85.0 | 80.0 |" in md
    assert "over 50 distinct problems per domain (binomial standard error at most 7.1 points" in md
    assert "- mixed: 20 GRPO steps on the union" in md and "- opd:" not in md   # only methods that ran
    assert "Divergence cost (mixed − expert, points): text -10.0, image +10.0" in md
    assert "Learning rate: AdamW, η = 0.001, constant." in md
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_table_has_a_row_per_model_and_skips_private_keys():
    results = {**RESULTS, "_sampled": {"base": {"text": 0.1}}}
    lines = results_table(results, ["text", "image"]).splitlines()
    assert lines[0] == "| model | text | image | average |" and len(lines) == 2 + 4
    assert describe_lr(2e-4, "cosine", 0.1) == "AdamW, η = 0.0002, cosine to 2e-05 over each loop"


def fake_all_run(folder, seed_shift):
    folder.mkdir()
    acc = lambda t, i: {"text": t + seed_shift, "image": i, "average": (t + seed_shift + i) / 2}
    results = {"base": acc(0.3, 0.8), "experts": acc(0.4, 0.9), "expert:text": acc(0.4, 0.7), "mixed": acc(0.35, 0.85),
               "copd": acc(0.45, 0.9), "_sampled": {}}
    (folder / "results.json").write_text(json.dumps(results))
    rows = [{"kind": "eval", "model": "mixed", "step": s, "final": False,
             "accuracy": {"text": {"greedy": 0.3 + s / 1000}, "image": {"greedy": 0.8}}} for s in (0, 50, 100)]
    rows += [{"kind": "divergence", "method": "copd", "pair": "image~text", "step": s, "overlap": 0.9 - s / 1000}
             for s in (20, 40)]
    rows += [{"kind": "divergence", "method": "experts", "pair": "image~text", "step": 100, "overlap": 0.8}]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_summary_over_seeds_gives_mean_and_t_interval_and_a_plot(tmp_path):
    from report import load_runs, plot_reproduction, summary_table
    fake_all_run(tmp_path / "s0", 0.0)
    fake_all_run(tmp_path / "s1", 0.1)
    runs = load_runs([tmp_path / "s0", tmp_path / "s1"])
    table = summary_table(runs).splitlines()
    assert table[0] == "| model | text | image | average |"
    # two seeds 10 points apart: s = 7.07, t(1) = 12.706, half-width 12.706 · 7.07 / √2 = 63.5
    assert "| copd | 50.0 ± 63.5 | 90.0 ± 0.0 | 70.0 ± 31.8 |" in table
    assert [line.split(" |")[0] for line in table[2:]] == ["| base", "| experts", "| expert:text", "| mixed", "| copd"]
    plot_reproduction(runs, str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_summary_names_a_folder_that_is_not_a_finished_run(tmp_path):
    import subprocess
    import sys
    (tmp_path / "half").mkdir()
    r = subprocess.run([sys.executable, "report.py", str(tmp_path / "half")], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 2 and "results.json: no such file" in r.stderr and "Traceback" not in r.stderr


def test_compute_table_takes_the_first_runs_tokens_and_the_median_wall_time():
    from report import compute_table
    cost = {"updates": 600, "rollout_tokens": 1000, "teacher_tokens": 0}
    runs = [{"_compute": {"mixed": cost, "copd": {**cost, "updates": 1200}},
             "_wall_s": {"mixed": wall, "copd:text": 2 * wall, "copd:image": 2 * wall}} for wall in (100, 300, 90)]
    rows = compute_table(runs).splitlines()[2:]
    assert rows == ["| mixed | 600 | 1,000 | 0 | 100 s |", "| copd | 1,200 | 1,000 | 0 | 400 s |"]


def test_a_compressed_metrics_log_reads_as_the_plain_one(tmp_path):
    import gzip
    from report import load_runs
    rows = [{"kind": "config", "settings": {"seed": 3}}, {"kind": "eval", "model": "base", "step": 0}]
    for name, opener in (("plain", open), ("packed", gzip.open)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"base": {"text": 0.5, "average": 0.5}}))
        with opener(folder / ("metrics.jsonl" + (".gz" if name == "packed" else "")), "wt") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_runs([str(tmp_path / "plain")]) == load_runs([str(tmp_path / "packed")]) == [
        ({"base": {"text": 0.5, "average": 0.5}}, rows)]
    (tmp_path / "packed" / "metrics.jsonl.gz").write_bytes(b"\x1f\x8b cut short")
    with pytest.raises(ValueError, match="packed: results.json or metrics.jsonl is not valid JSON"):
        load_runs([str(tmp_path / "packed")])


def test_a_folder_listed_twice_a_corrupt_file_or_other_experts_is_one_line(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run_folder(name, domains, results_text=None):
        folder = tmp_path / name
        folder.mkdir()
        row = {d: 0.5 for d in domains}
        (folder / "results.json").write_text(results_text or json.dumps({"base": {**row, "average": 0.5}}))
        (folder / "metrics.jsonl").write_text("")
        return str(folder)
    a = run_folder("a", ["text", "image"])
    for folders, message in (([a, a], "is listed twice"),
                             ([a, run_folder("b", ["text", "image", "video"])], "a summary compares runs of the same experts"),
                             ([a, run_folder("c", ["text"], "{not json")], "is not valid JSON")):
        r = subprocess.run([sys.executable, os.path.join(root, "report.py"), *folders], capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_results_give_each_models_paired_gain_over_base_on_the_same_problems(tmp_path):
    """Four problems: base gets 1 and 2 right, the expert 2, 3 and 4: +25 points, paired."""
    results = {**RESULTS, "_right": {"base": {"text": "1100", "image": "1111"},
                                     "experts": {"text": "0111", "image": "1111"}}}
    write_fake(tmp_path, results)
    md = (tmp_path / "results.md").read_text()
    assert "Each model − base on the same problems (points, ± 2 standard errors of the paired difference):" in md
    # differences −1, 0, +1, +1: mean 0.25, sd 0.957, 2·sd/√4 = 0.957
    assert "| experts | +25.0 ± 95.7 | +0.0 ± 0.0 |" in md
