"""
Results a person reads: OUT/results.json (method -> domain -> held-out greedy accuracy, with
"average"), OUT/results.md (the table with the budgets and the seed) and OUT/curves.png
(accuracy per domain over training; top-10 overlap between branches and between experts).
Each file is written whole or not at all. Also the summary of several seeds
(`python report.py RUN...`).
"""

import json
import os


def budgets(K: int, T: int, model: str | None) -> dict:
    """What each method trains, in steps, for K experts of T steps."""
    return {"base": "π_0 (warm start)" if not model else f"π_0 = {model}",
            "experts": f"{T} GRPO steps per expert ({K} experts)",
            "mixed": f"{K * T} GRPO steps on the union",
            "opd": f"experts + {T} OPD steps per direction",
            "mopd": f"experts + {T} multi-teacher OPD steps from π_0",
            "copd": f"{K * T} steps per branch ({K} branches), merged by averaging"}


def results_table(results: dict, domains: list) -> str:
    cols = domains + ["average"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results.items():
        if not name.startswith("_"):
            lines.append(f"| {name} | " + " | ".join(f"{100 * r[c]:.1f}" for c in cols) + " |")
    return "\n".join(lines)


def describe_lr(lr: float, schedule: str, min_frac: float) -> str:
    decay = f", cosine to {min_frac * lr:g} over each loop" if schedule == "cosine" else ", constant"
    return f"AdamW, η = {lr:g}{decay}"


def write_results(out: str, results: dict, domains: list, curves: dict, divergence: dict, *,
                  title: str, eval_size: int, budget: dict, learning_rate: str):
    """results.json, results.md and curves.png, each written whole or not at all. Adds the
    divergence cost (mixed − expert per domain) to `results` when both ran. `title`: the
    command's defining flags; `budget`: {method: its steps} (budgets()); `learning_rate`:
    describe_lr()."""
    cost = {m: round(results[m]["average"] - results["base"]["average"], 4)
            for m in results if not m.startswith("_") and "base" in results}
    if "mixed" in results and "experts" in results:
        results["_divergence_cost"] = {d: round(results["mixed"][d] - results["experts"][d], 4) for d in domains}
    _atomic_write(os.path.join(out, "results.json"), json.dumps(results, indent=1))
    md = [f"# Results: {title}", "",
          f"Held-out greedy accuracy (%) over {eval_size} distinct problems per domain (binomial standard "
          f"error at most {50 / eval_size ** 0.5:.1f} points; each in results.json `_stderr`).", "",
          results_table(results, domains), "", "Budgets:", ""]
    trained = {{"expert": "experts", "rlvr": "experts"}.get(k.split(":")[0], k.split(":")[0]) for k in results}
    md += [f"- {m}: {b}" for m, b in budget.items() if m in trained]
    md += ["", f"Learning rate: {learning_rate}."]
    if "_divergence_cost" in results:
        md += ["", "Divergence cost (mixed − expert, points): " +
               ", ".join(f"{d} {100 * v:+.1f}" for d, v in results["_divergence_cost"].items())]
    if "_grad_cosine" in results:
        md += ["", "Gradient cosine between domains on π_0: " +
               ", ".join(f"{k} {v:+.3f}" for k, v in results["_grad_cosine"].items())]
    md += ["", "Gain over base (average, points): " + ", ".join(f"{m} {100 * v:+.1f}" for m, v in cost.items())]
    _atomic_write(os.path.join(out, "results.md"), "\n".join(md) + "\n")
    plot_curves(domains, curves, divergence, os.path.join(out, "curves.png"))


def _atomic_write(path: str, text: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _save_figure(fig, path: str):
    """Written under a temporary name and renamed: a plot is whole or absent."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def plot_curves(domains: list, curves: dict, divergence: dict, path: str):
    """Accuracy per domain over training for every model ({name: [(step, {domain: acc})]});
    top-k overlap between branches (CoPD) against the independently trained experts
    ({method: {pair: [(step, {"overlap", ...})]}})."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(domains) + 1
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6))
    for ax, d in zip(axes, domains):
        for name, points in curves.items():
            if len(points) > 1:
                ax.plot([s for s, _ in points], [100 * a[d] for _, a in points], label=name, marker=".")
        ax.set_title(f"{d}: held-out accuracy"), ax.set_xlabel("step"), ax.set_ylabel("%")
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    for method, pairs in divergence.items():
        for pair, points in pairs.items():
            style = "-" if "base" not in pair else ":"
            ax.plot([s for s, _ in points], [p["overlap"] for _, p in points], style, marker="o",
                    label=f"{method} {pair}")
    ax.set_title("top-10 overlap"), ax.set_xlabel("step"), ax.legend(fontsize=7)
    _save_figure(fig, path)


# -----------------------------------------------------------------------------
# several seeds of `--method all`: the table with mean and spread, and one plot
#
#     python report.py runs/all-s0 runs/all-s1 runs/all-s2 --plot docs/reproduction.png

SUMMARY_ROWS = ("base", "experts", "expert:{d}", "mixed", "opd", "mopd", "copd", "copd:{d}")


def load_runs(folders: list) -> list:
    """(results.json, metrics.jsonl rows) of each run folder; a missing file is named."""
    runs = []
    for folder in folders:
        paths = [os.path.join(folder, f) for f in ("results.json", "metrics.jsonl")]
        for p in paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p}: no such file (is {folder} a finished run?)")
        with open(paths[0]) as f:
            results = json.load(f)
        with open(paths[1]) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        runs.append((results, rows))
    return runs


def summary_table(runs: list) -> str:
    """Held-out greedy accuracy (%) per model and domain: mean ± half the range over seeds."""
    domains = [k for k in runs[0][0]["base"] if k != "average"]
    names = [r.format(d=d) for r in SUMMARY_ROWS for d in (domains if "{d}" in r else [None])]
    cols = domains + ["average"]
    lines = [f"| model | {' | '.join(cols)} |", "|---" * (len(cols) + 1) + "|"]
    for name in names:
        if not all(name in results for results, _ in runs):
            continue
        cells = []
        for c in cols:
            values = [100 * results[name][c] for results, _ in runs]
            mean, spread = sum(values) / len(values), (max(values) - min(values)) / 2
            cells.append(f"{mean:.1f} ± {spread:.1f}")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _mean_curve(curves: list):
    """Mean over runs of (step, value) curves, on the steps every run has."""
    steps = sorted(set.intersection(*[set(dict(c)) for c in curves]))
    return steps, [sum(dict(c)[s] for c in curves) / len(curves) for s in steps]


def plot_reproduction(runs: list, path: str):
    """Left: mean held-out accuracy over domains during training (mean over seeds). Right:
    top-10 overlap between the two CoPD branches over training against the independently
    trained experts' at the end of their training."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (acc_ax, ov_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    domains = [k for k in runs[0][0]["base"] if k != "average"]
    models = [f"expert:{d}" for d in domains] + ["mixed", "mopd"] + [f"copd:{d}" for d in domains]
    for model in models:
        curves = [[(r["step"], 100 * sum(a["greedy"] for a in r["accuracy"].values()) / len(r["accuracy"]))
                   for r in rows if r.get("kind") == "eval" and r["model"] == model and not r["final"]]
                  for _, rows in runs]
        if all(len(c) > 1 for c in curves):
            acc_ax.plot(*_mean_curve(curves), marker=".", label=model, linestyle="--" if "copd" not in model else "-")
    seeds = f"{len(runs)} seed" + ("s" if len(runs) > 1 else "")
    acc_ax.set_title(f"held-out accuracy, mean of domains ({seeds})")
    acc_ax.set_xlabel("step (of each model)"), acc_ax.set_ylabel("%"), acc_ax.legend(fontsize=7)
    for method, style in (("copd", "-"), ("experts", "s")):
        pairs = {r["pair"] for _, rows in runs for r in rows
                 if r.get("kind") == "divergence" and r["method"] == method and "base" not in r["pair"]}
        for pair in sorted(pairs):
            curves = [[(r["step"], r["overlap"]) for r in rows if r.get("kind") == "divergence"
                       and r["method"] == method and r["pair"] == pair] for _, rows in runs]
            steps, values = _mean_curve(curves)
            ov_ax.plot(steps, values, style, markersize=8, label=f"{method}: {pair}")
    ov_ax.set_title(f"top-10 overlap between the two models ({seeds})")
    ov_ax.set_xlabel("step"), ov_ax.legend(fontsize=7)
    _save_figure(fig, path)


if __name__ == "__main__":
    import argparse
    import sys
    ap = argparse.ArgumentParser(description="Mean and spread of several `--method all` runs, and their plot.")
    ap.add_argument("runs", nargs="+", help="run folders (each with results.json and metrics.jsonl)")
    ap.add_argument("--plot", default=None, help="write the accuracy and overlap plot here (.png)")
    a = ap.parse_args()
    try:
        loaded = load_runs(a.runs)
    except (FileNotFoundError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(summary_table(loaded))
    if a.plot:
        os.makedirs(os.path.dirname(a.plot) or ".", exist_ok=True)
        plot_reproduction(loaded, a.plot)
        print(f"\nwrote {a.plot}")
