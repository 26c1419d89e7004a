import json
import os
from types import SimpleNamespace

from report import results_table, write_results


def fake_run(tmp_path):
    args = SimpleNamespace(out=str(tmp_path), method="all", preset="smoke", seed=3, model=None)
    return SimpleNamespace(
        args=args, domains=["text", "image"], heldout={"text": [0] * 50, "image": [0] * 50},
        p=SimpleNamespace(steps=10, lr=1e-3, lr_schedule="constant", min_lr_frac=0.1),
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
    assert "Learning rate: AdamW, η = 0.001, constant." in md
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_table_has_a_row_per_model_and_skips_private_keys(tmp_path):
    run = fake_run(tmp_path)
    run.results["_sampled"] = {"base": {"text": 0.1}}
    lines = results_table(run).splitlines()
    assert lines[0] == "| model | text | image | average |" and len(lines) == 2 + 4


def test_memory_plan_counts_adam_for_trained_copies_and_weights_for_frozen_ones(tiny):
    from report import _size as size, memory_plan, model_copies
    from rlvr import RLConfig
    from opd import OPDConfig
    from rollout import SamplingConfig
    model, _ = tiny
    run = SimpleNamespace(model0=model, domains=["text", "image", "video"], layout=None,
                          args=SimpleNamespace(method="copd"),
                          p=SimpleNamespace(rl=RLConfig(prompts_per_step=2, group_size=4, sampling=SamplingConfig(max_new_tokens=6)),
                                            opd=OPDConfig(prompts_per_step=2, samples_per_prompt=2)))
    weights = sum(p.numel() * 4 for p in model.parameters())
    text = model.config.text_config
    kv_row = 2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4
    plan = memory_plan(run, prompt_len=10)
    assert model_copies("copd", 3) == (3, 1) and model_copies("all", 3) == (3, 4)
    assert f"| trained copy: weights, gradients, AdamW | {size(4 * weights)} | 3 | {size(12 * weights)} |" in plan
    assert f"| frozen copy (π_0, experts, teachers) | {size(weights)} | 1 |" in plan
    assert f"| KV cache: 8 rows x 16 tokens | {size(kv_row * 16 * 8)} | 1 |" in plan
    assert f"| all (without backward's activations) | | | {size(13 * weights + kv_row * 16 * 8)} |" in plan


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


def test_summary_over_seeds_gives_mean_and_half_range_and_a_plot(tmp_path):
    from report import load_runs, plot_reproduction, summary_table
    fake_all_run(tmp_path / "s0", 0.0)
    fake_all_run(tmp_path / "s1", 0.1)
    runs = load_runs([tmp_path / "s0", tmp_path / "s1"])
    table = summary_table(runs).splitlines()
    assert table[0] == "| model | text | image | average |"
    assert "| copd | 50.0 ± 5.0 | 90.0 ± 0.0 | 70.0 ± 2.5 |" in table
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
