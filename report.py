"""
Results a person reads: OUT/results.json (method -> domain -> held-out greedy accuracy, with
"average"), OUT/results.md (the table with the budgets and the seed) and OUT/curves.png
(accuracy per domain over training; top-10 overlap between branches and between experts).
Each file is written whole or not at all. `run` is train.Run.
"""

import json
import os


def budgets(run) -> dict:
    K, T = len(run.domains), run.p.steps
    return {"base": "π_0 (warm start)" if not run.args.model else f"π_0 = {run.args.model}",
            "experts": f"{T} GRPO steps per expert ({K} experts)",
            "mixed": f"{K * T} GRPO steps on the union",
            "opd": f"experts + {T} OPD steps per direction",
            "mopd": f"experts + {T} multi-teacher OPD steps from π_0",
            "copd": f"{K * T} steps per branch ({K} branches), merged by averaging"}


def results_table(run) -> str:
    cols = run.domains + ["average"]
    rows = [k for k in run.results if not k.startswith("_")]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in rows:
        r = run.results[name]
        lines.append(f"| {name} | " + " | ".join(f"{100 * r[c]:.1f}" for c in cols) + " |")
    return "\n".join(lines)


def write_results(run):
    """results.json, results.md and curves.png, each written whole or not at all."""
    out = run.args.out
    cost = {m: round(run.results[m]["average"] - run.results["base"]["average"], 4)
            for m in run.results if not m.startswith("_") and "base" in run.results}
    if "mixed" in run.results and "experts" in run.results:
        run.results["_divergence_cost"] = {d: round(run.results["mixed"][d] - run.results["experts"][d], 4)
                                          for d in run.domains}
    _atomic_write(os.path.join(out, "results.json"), json.dumps(run.results, indent=1))
    md = [f"# Results: --experts {','.join(run.domains)} --method {run.args.method} "
          f"--preset {run.args.preset} --seed {run.args.seed}", "",
          f"Held-out greedy accuracy (%) over {len(run.heldout[run.domains[0]])} prompts per domain.", "",
          results_table(run), "", "Budgets:", ""]
    trained = {{"expert": "experts", "rlvr": "experts"}.get(k.split(":")[0], k.split(":")[0]) for k in run.results}
    md += [f"- {m}: {b}" for m, b in budgets(run).items() if m in trained]
    if "_divergence_cost" in run.results:
        md += ["", "Divergence cost (mixed − expert, points): " +
               ", ".join(f"{d} {100 * v:+.1f}" for d, v in run.results["_divergence_cost"].items())]
    if "_grad_cosine" in run.results:
        md += ["", "Gradient cosine between domains on π_0: " +
               ", ".join(f"{k} {v:+.3f}" for k, v in run.results["_grad_cosine"].items())]
    md += ["", "Gain over base (average, points): " + ", ".join(f"{m} {100 * v:+.1f}" for m, v in cost.items())]
    _atomic_write(os.path.join(out, "results.md"), "\n".join(md) + "\n")
    plot_curves(run, os.path.join(out, "curves.png"))


def _atomic_write(path: str, text: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def plot_curves(run, path: str):
    """Accuracy per domain over training for every model; top-k overlap between branches
    (CoPD) against the independently trained experts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(run.domains) + 1
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6))
    for ax, d in zip(axes, run.domains):
        for name, points in run.curves.items():
            if len(points) > 1:
                ax.plot([s for s, _ in points], [100 * a[d] for _, a in points], label=name, marker=".")
        ax.set_title(f"{d}: held-out accuracy"), ax.set_xlabel("step"), ax.set_ylabel("%")
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    for method, pairs in run.divergence.items():
        for pair, points in pairs.items():
            style = "-" if "base" not in pair else ":"
            ax.plot([s for s, _ in points], [p["overlap"] for _, p in points], style, marker="o",
                    label=f"{method} {pair}")
    ax.set_title("top-10 overlap"), ax.set_xlabel("step"), ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
