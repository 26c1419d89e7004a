"""
Results a person reads: OUT/results.json (method -> domain -> held-out greedy accuracy, with
"average"), OUT/results.md (the table with the budgets and the seed) and OUT/curves.png
(accuracy per domain over training; top-10 overlap between branches and between experts).
Each file is written whole or not at all. Also the summary of several seeds
(`python report.py RUN...`).
"""

import gzip
import json
import os
import statistics

from claims import claims_table, paired_difference, t_interval


def budgets(K: int, T: int, model: str | None) -> dict:
    """What each method trains, in steps, for K experts of T steps."""
    return {"base": "π_0 (warm start)" if not model else f"π_0 = {model}",
            "experts": f"{T} GRPO steps per expert ({K} experts)",
            "mixed": f"{K * T} GRPO steps on the union",
            "opd": f"experts + {T} OPD steps per direction",
            "mopd": f"experts + {K * T} multi-teacher OPD steps from π_0 (as one CoPD branch)",
            "copd": f"{K * T} steps per branch ({K} branches), merged by averaging",
            "copd@equal": f"{T} steps per branch ({K} branches: {K * T} in all, as mixed RLVR), merged by averaging"}


def results_table(results: dict, domains: list) -> str:
    cols = domains + ["average"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results.items():
        if not name.startswith("_"):
            lines.append(f"| {name} | " + " | ".join(f"{100 * r[c]:.1f}" for c in cols) + " |")
    return "\n".join(lines)


def _members(name: str, models) -> list:
    """The models a result row is made of: "experts" (or "rlvr") every expert:d, "opd" every
    direction, "copd" / "copd@equal" their branches; any other row, itself."""
    prefix = {"experts": "expert:", "rlvr": "expert:"}.get(name, name + ":")
    return [m for m in models if m.startswith(prefix)] or [name]


def compute(results: dict, rows: list) -> dict:
    """What each result row cost, from the metrics log: optimizer updates, rollout tokens the
    students sampled (GRPO and OPD rollouts) and teacher tokens scored (OPD); the same on every
    rerun (wall time is apart, in `_wall_s`). A summary row sums its members (`_members`).
    Static OPD and MOPD start from finished experts: their rows count the distillation alone;
    add the experts' row for the whole pipeline."""
    per_model = {}
    for r in rows:
        if r.get("kind") != "train":
            continue
        c = per_model.setdefault(r["model"], {"updates": 0, "rollout_tokens": 0, "teacher_tokens": 0})
        teacher = sum(v for k, v in r.items() if k.startswith("opd_tokens"))
        c["updates"] += not r.get("skipped")
        c["rollout_tokens"] += r.get("tokens", 0) + teacher
        c["teacher_tokens"] += teacher
    out = {}
    for name in results:
        if name.startswith("_") or name == "base":
            continue
        out[name] = {k: sum(per_model.get(m, {}).get(k, 0) for m in _members(name, per_model))
                     for k in ("updates", "rollout_tokens", "teacher_tokens")}
    return out


def wall_time(results: dict, name: str) -> float:
    """Seconds a result row took (its stage's time; a summary row: the sum of its members')."""
    wall = results.get("_wall_s", {})
    return wall[name] if name in wall else sum(wall.get(m, 0) for m in _members(name, wall))


def compute_table(runs: list) -> str:
    """Each row's compute over the results of one or more runs of a setting: updates and tokens
    from the first (every seed takes the same updates), wall time the median over the runs (one
    run's time moves with whatever else shares the cores)."""
    lines = ["| model | optimizer updates | rollout tokens | teacher tokens | wall time |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {c['updates']:,} | {c['rollout_tokens']:,} | {c['teacher_tokens']:,} | "
              f"{statistics.median(wall_time(r, m) for r in runs):.0f} s |" for m, c in runs[0]["_compute"].items()]
    return "\n".join(lines)


def describe_lr(lr: float, schedule: str, min_frac: float) -> str:
    decay = f", cosine to {min_frac * lr:g} over each loop" if schedule == "cosine" else ", constant"
    return f"AdamW, η = {lr:g}{decay}"


def write_results(out: str, results: dict, domains: list, curves: dict, divergence: dict, *,
                  title: str, eval_size: int, budget: dict, learning_rate: str):
    """results.md, curves.png and results.json, each written whole or not at all, results.json
    last (it marks a finished run). Adds the
    divergence cost (mixed − expert per domain) to `results` when both ran. `title`: the
    command's defining flags; `budget`: {method: its steps} (budgets()); `learning_rate`:
    describe_lr()."""
    cost = {m: round(results[m]["average"] - results["base"]["average"], 4)
            for m in results if not m.startswith("_") and "base" in results}
    metrics = os.path.join(out, "metrics.jsonl")
    if os.path.isfile(metrics):
        with open(metrics) as f:
            results["_compute"] = compute(results, [json.loads(line) for line in f if line.strip()])
    if "mixed" in results and "experts" in results:
        results["_divergence_cost"] = {d: round(results["mixed"][d] - results["experts"][d], 4) for d in domains}
    md = [f"# Results: {title}", "",
          f"Held-out greedy accuracy (%) over {eval_size} distinct problems per domain (binomial standard "
          f"error at most {50 / eval_size ** 0.5:.1f} points; each in results.json `_stderr`).", "",
          results_table(results, domains), "", "Budgets:", ""]
    trained = {{"expert": "experts", "rlvr": "experts"}.get(k.split(":")[0], k.split(":")[0]) for k in results}
    md += [f"- {m}: {b}" for m, b in budget.items() if m in trained]
    md += ["", f"Learning rate: {learning_rate}."]
    if results.get("_machine"):
        md += ["", "Computed on: " + "; then ".join(results["_machine"]) + "."]
    if results.get("_pi0"):
        md += ["", f"π_0: {results['_pi0']}."]
    if results.get("_compute"):
        md += ["", "Compute (static OPD and MOPD rows count the distillation alone; they start from the experts):",
               "", compute_table([results])]
    if "_divergence_cost" in results:
        md += ["", "Divergence cost (mixed − expert, points): " +
               ", ".join(f"{d} {100 * v:+.1f}" for d, v in results["_divergence_cost"].items())]
    if "_grad_cosine" in results:
        md += ["", "Gradient cosine between domains on π_0: " +
               ", ".join(f"{k} {v:+.3f}" for k, v in results["_grad_cosine"].items())]
    md += ["", "Gain over base (average, points): " + ", ".join(f"{m} {100 * v:+.1f}" for m, v in cost.items())]
    right = results.get("_right", {})
    if "base" in right:
        md += ["", "Each model − base on the same problems (points, ± 2 standard errors of the paired difference):",
               "", "| model | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
        for m, r in right.items():
            if m != "base":
                md.append(f"| {m} | " + " | ".join("{:+.1f} ± {:.1f}".format(*paired_difference(r[d], right["base"][d]))
                                                   for d in domains) + " |")
    for method, probes in results.get("_merge_probes", {}).items():
        md += ["", *merge_probes_md(results, method, probes, domains, curves.get(method, []))]
    _atomic_write(os.path.join(out, "results.md"), "\n".join(md) + "\n")
    drift = {m: p["drift"] for m, p in results.get("_merge_probes", {}).items() if p.get("drift")}
    plot_curves(domains, curves, divergence, os.path.join(out, "curves.png"), drift)
    # last: a results.json marks a finished run (reproduce.py keeps it, --resume refuses it)
    _atomic_write(os.path.join(out, "results.json"), json.dumps(results, indent=1))


def merge_probes_md(results: dict, method: str, probes: dict, domains: list, merged_curve: list) -> list:
    """results.md's section on one CoPD stage's merge (probes.py): each branch on every domain
    beside the merged model and the output ensemble, the accuracy along the line between linked
    branches, the merged model over training, and the drift."""
    cols = domains + ["average"]
    row = lambda label, accs: (f"| {label} | " + " | ".join(f"{100 * accs[c]:.1f}" for c in domains) +
                               f" | {100 * sum(accs[c] for c in domains) / len(domains):.1f} |")
    md = [f"### The merge of {method} (probes)", "",
          "Held-out greedy accuracy (%): each branch on every domain, their uniform average (the merged model) "
          "and their output ensemble (greedy from the mean of the branches' next-token probabilities):", "",
          "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    md += [row(f"branch {d}", results[f"{method}:{d}"]) for d in domains if f"{method}:{d}" in results]
    md += [row("merged (average)", results[method])] if method in results else []
    md += [row("output ensemble", probes["ensemble"])] if "ensemble" in probes else []
    for pair, curve in probes.get("interpolation", {}).items():
        a, b = pair.split("~")
        md += ["", f"Along (1−α)·θ^({a}) + α·θ^({b}):", "", "| α | " + " | ".join(cols) + " |",
               "|---" * (len(cols) + 1) + "|"] + [row(f"{alpha:g}", accs) for alpha, accs in curve]
    if merged_curve:
        md += ["", "The merged model over training (mean over domains, %; the evals' smaller problem set): " +
               ", ".join(f"step {step} {100 * sum(a.values()) / len(a):.1f}" for step, a in merged_curve)]
    if probes.get("drift"):
        step, last = probes["drift"][-1]
        md += ["", f"Drift at update {step} (L2 distance over ‖θ_0‖): " +
               ", ".join(f"{pair} {value:.3f}" for pair, value in last.items())]
    if f"probes:{method}" in results.get("_wall_s", {}):
        md += ["", f"The probes took {results['_wall_s'][f'probes:{method}']:.0f} s of this run."]
    return md


def _atomic_write(path: str, text: str):
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _save_figure(fig, path: str):
    """Written under a temporary name and renamed: a plot is whole or absent."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def plot_curves(domains: list, curves: dict, divergence: dict, path: str, drift: dict | None = None):
    """Accuracy per domain over training for every model ({name: [(step, {domain: acc})]}, a
    CoPD stage's name its merged model); top-k overlap between branches (CoPD) against the
    independently trained experts ({method: {pair: [(step, {"overlap", ...})]}}); and CoPD's
    drift ({method: [(step, {pair: distance over ‖θ_0‖})]})."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(domains) + 1 + bool(drift)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6))
    for ax, d in zip(axes, domains):
        for name, points in curves.items():
            if len(points) > 1:
                ax.plot([s for s, _ in points], [100 * a[d] for _, a in points], label=name, marker=".")
        ax.set_title(f"{d}: held-out accuracy"), ax.set_xlabel("step"), ax.set_ylabel("%")
    if axes[0].get_legend_handles_labels()[0]:   # --method base has no curve
        axes[0].legend(fontsize=7)
    ax = axes[len(domains)]
    for method, pairs in divergence.items():
        for pair, points in pairs.items():
            style = "-" if "base" not in pair else ":"
            ax.plot([s for s, _ in points], [p["overlap"] for _, p in points], style, marker="o",
                    label=f"{method} {pair}")
    ax.set_title("top-10 overlap"), ax.set_xlabel("step")
    if ax.get_legend_handles_labels()[0]:   # a method without two models to compare has none
        ax.legend(fontsize=7)
    if drift:
        ax = axes[-1]
        for method, points in drift.items():
            for pair in points[-1][1]:
                ax.plot([s for s, _ in points], [d[pair] for _, d in points], "-" if "base" not in pair else ":",
                        marker=".", label=f"{method} {pair}")
        ax.set_title("drift: L2 distance / ‖θ_0‖"), ax.set_xlabel("update"), ax.legend(fontsize=7)
    _save_figure(fig, path)


# -----------------------------------------------------------------------------
# several seeds of `--method all`: the table with mean and spread, and one plot
#
#     python report.py runs/all-s0 runs/all-s1 runs/all-s2 --plot summary.png

SUMMARY_ROWS = ("base", "experts", "expert:{d}", "mixed", "opd", "mopd", "copd", "copd:{d}", "copd@equal")


def load_runs(folders: list) -> list:
    """(results.json, metrics.jsonl rows) of each run folder, one folder a seed: a missing or
    unreadable file is named, and so is a folder listed twice or a run of other experts. A
    metrics.jsonl.gz stands in for metrics.jsonl (the runs kept in docs/runs are compressed)."""
    runs, seen = [], {}
    for folder in folders:
        real = os.path.realpath(folder)
        if real in seen:
            raise ValueError(f"{folder} is listed twice ({seen[real]}): each run folder counts as one seed")
        seen[real] = folder
        paths = [os.path.join(folder, f) for f in ("results.json", "metrics.jsonl")]
        if not os.path.isfile(paths[1]) and os.path.isfile(paths[1] + ".gz"):
            paths[1] += ".gz"
        for p in paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p}: no such file (is {folder} a finished run?)")
        try:
            with open(paths[0]) as f:
                results = json.load(f)
            with (gzip.open(paths[1], "rt") if paths[1].endswith(".gz") else open(paths[1])) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        except (ValueError, UnicodeDecodeError, OSError, EOFError) as e:
            raise ValueError(f"{folder}: results.json or metrics.jsonl is not valid JSON ({e})") from None
        domains = sorted(d for d in results.get("base", {}) if d != "average")
        if runs and domains != runs[0][2]:
            raise ValueError(f"{folder} trained {','.join(domains)}, {folders[0]} {','.join(runs[0][2])}: "
                             "a summary compares runs of the same experts")
        runs.append((results, rows, domains))
    return [(results, rows) for results, rows, _ in runs]


def summary_table(runs: list) -> str:
    """Held-out greedy accuracy (%) per model and domain: the mean over seeds ± the half-width of
    its 95% t-interval (how closely the seeds pin the mean down; a gap between two methods is
    judged by the claims' paired intervals, which are narrower)."""
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
            mean, low, high = t_interval(values)
            cells.append(f"{mean:.1f} ± {(high - low) / 2:.1f}" if len(values) > 1 else f"{mean:.1f}")
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
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(summary_table(loaded))
    print()
    print(f"The paper's claims: paired differences over {len(loaded)} seed(s), 95% t-interval over seeds.\n")
    print(claims_table(loaded))
    if a.plot:
        os.makedirs(os.path.dirname(a.plot) or ".", exist_ok=True)
        plot_reproduction(loaded, a.plot)
        print(f"\nwrote {a.plot}")
