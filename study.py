"""
The merge studies' reports: where CoPD's all-in-one model loses skill, and whether its lead over
mixed RLVR grows with conflict. `python reproduce.py --study conflict|pull` runs a study and
writes its report with `write_study_report`.

- conflict: `--experts video,rename` with rename's name trade on a share p of its clips
  (`--rename-trade p`, p ∈ {0, 0.5, 1}; p = 0: no conflict). The paper predicts that mixed
  RLVR's divergence cost (mixed − expert) deepens as p rises and that CoPD's lead over mixed
  RLVR grows with it, at equal updates too.
- pull: at p = 1, CoPD at both budgets with a stronger distillation pull (β of Eq. 8,
  `--opd-beta`) or a larger OPD share (`--rl-opd-ratio`), against the p = 1 runs (β = 1,
  S_RL : S_OPD = 1.5 : 1), whose experts and mixed RLVR they share.

Every number is a paired difference within a seed (points), its mean over seeds and a 95%
t-interval; a slope over p is fitted per seed and its mean taken over seeds the same way.
"""

import os

from claims import holm, p_value, t_interval, verdict
from report import _atomic_write, _mean_curve, _save_figure, load_runs

def measures(results: dict, domains: list) -> dict:
    """{measure: value in points} of one run, for those it can answer. `name` is copd or copd@equal."""
    out = {}
    have = lambda *names: all(n in results for n in names)
    for d in domains:
        if have("mixed", f"expert:{d}"):
            out[f"mixed − expert on {d}"] = 100 * (results["mixed"][d] - results[f"expert:{d}"][d])
    for name, label in (("copd", "CoPD"), ("copd@equal", "CoPD@equal")):
        if not have(name):
            continue
        if have("mixed"):
            out[f"{label} − mixed RLVR"] = 100 * (results[name]["average"] - results["mixed"]["average"])
        if have("mopd"):
            out[f"{label} − MOPD"] = 100 * (results[name]["average"] - results["mopd"]["average"])
        if have(*(f"{name}:{d}" for d in domains)):
            # the merge: the merged model against each branch on the branch's own domain
            out[f"{label}: merged − branch, own domain"] = 100 * sum(
                results[name][d] - results[f"{name}:{d}"][d] for d in domains) / len(domains)
            if have(*(f"expert:{d}" for d in domains)):
                # the co-evolution: each branch against the expert of its domain
                out[f"{label}: branch − expert, own domain"] = 100 * sum(
                    results[f"{name}:{d}"][d] - results[f"expert:{d}"][d] for d in domains) / len(domains)
        probes = results.get("_merge_probes", {}).get(name, {})
        if "ensemble" in probes:
            ensemble = sum(probes["ensemble"][d] for d in domains) / len(domains)
            out[f"{label}: ensemble − merged"] = 100 * (ensemble - results[name]["average"])
        if probes.get("drift"):
            last = probes["drift"][-1][1]
            pair = next((k for k in last if "base" not in k), None)
            if pair:
                out[f"{label}: drift between branches (% of ‖θ_0‖)"] = 100 * last[pair]
    cosine = results.get("_grad_cosine", {})
    if cosine:
        out["gradient cosine on π_0 (×100)"] = 100 * sum(cosine.values()) / len(cosine)
    return out


def cell(values: list) -> str:
    mean, low, high = t_interval(values)
    return f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]" if len(values) > 1 else f"{mean:+.1f}"


def slope(xs: list, ys: list) -> float:
    """The least-squares slope of ys on xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


# the predictions the conflict study tests, with the sign the paper expects of the slope over p
PREDICTIONS = {"mixed − expert on video": -1, "mixed − expert on rename": -1, "CoPD − mixed RLVR": +1,
               "CoPD@equal − mixed RLVR": +1}


def conflict_report(settings: dict, runs: dict, path: str) -> list:
    """settings: {setting: p}; runs: {setting: loaded runs, seeds in the same order}."""
    domains = [k for k in next(iter(runs.values()))[0][0]["base"] if k != "average"]
    per = {s: [measures(res, domains) for res, _ in rs] for s, rs in runs.items()}
    names = [m for m in per[next(iter(per))][0] if all(m in x for rs in per.values() for x in rs)]
    ps = [settings[s] for s in runs]
    seeds = len(next(iter(runs.values())))
    md = [f"## The conflict dose-response ({seeds} seed{'s' * (seeds > 1)})", "",
          "Each measure per p (points; mean over seeds [95% t-interval]) and its slope over p (points from p = 0 to "
          "p = 1, fitted per seed):", "",
          "| measure | " + " | ".join(f"p = {p:g}" for p in ps) + " | slope over p |",
          "|---" * (len(ps) + 2) + "|"]
    slopes = {}
    for m in names:
        slopes[m] = [slope(ps, [per[s][i][m] for s in runs]) for i in range(seeds)]
        md.append(f"| {m} | " + " | ".join(cell([x[m] for x in per[s]]) for s in runs) + f" | {cell(slopes[m])} |")
    tested = {m: slopes[m] for m in PREDICTIONS if m in slopes}
    p = {m: p_value(v) for m, v in tested.items()}
    adjusted = holm(p)
    md += ["", "The paper's predictions, as slopes over p (Holm's correction over these "
           f"{len(tested)}):", "",
           "| prediction | slope per seed | mean [95% interval] | p | verdict | Holm-adjusted p | Holm verdict |",
           "|---|---|---|---|---|---|---|"]
    for m, values in tested.items():
        sign = PREDICTIONS[m]
        claim = f"{m} {'falls' if sign < 0 else 'rises'} with p"
        mean, low, high = t_interval([sign * v for v in values])
        held = "undecided" if adjusted[m] >= 0.05 else "holds" if mean > 0 else "fails"
        md.append(f"| {claim} | {', '.join(f'{v:+.1f}' for v in values)} | {cell(values)} | {p[m]:.3f} | "
                  f"{verdict(low, high)} | {adjusted[m]:.3f} | {held} |")
    plot_probes({f"p = {settings[s]:g}": rs for s, rs in runs.items()}, domains, path + ".png")
    return md


def pull_report(settings: dict, runs: dict, path: str) -> list:
    """settings: {setting: label}; the first setting is the baseline, whose experts and mixed
    RLVR every other setting's CoPD is compared with (the same seed's)."""
    base_setting = next(iter(runs))
    domains = [k for k in runs[base_setting][0][0]["base"] if k != "average"]
    shared = ("mixed", "mopd", *(f"expert:{d}" for d in domains))
    per = {}
    for s, rs in runs.items():
        per[s] = [measures({**res, **{k: base[k] for k in shared if k in base}}, domains)
                  for (res, _), (base, _) in zip(rs, runs[base_setting])]
    names = [m for m in per[base_setting][0] if m.startswith("CoPD") and "MOPD" not in m and all(m in x for rs in per.values() for x in rs)]
    seeds = len(runs[base_setting])
    md = [f"## The distillation pull at p = 1 ({seeds} seed{'s' * (seeds > 1)})", "",
          "Each measure per setting (points; mean over seeds [95% t-interval]); mixed RLVR, MOPD and the experts are "
          "the first row's runs of the same seed:", "",
          "| setting | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    md += [f"| {settings[s]} | " + " | ".join(cell([x[m] for x in per[s]]) for m in names) + " |" for s in runs]
    # what a stronger pull buys and costs, against the same seed's baseline CoPD: the merged model,
    # each branch on its own domain, and how far apart the branches end
    changes = {}
    for name, label in (("copd", "CoPD"), ("copd@equal", "CoPD@equal")):
        changes[f"{label}: merged"] = lambda res, n=name: 100 * res[n]["average"]
        for d in domains:
            changes[f"{label}: {d} branch on {d}"] = lambda res, n=name, d=d: 100 * res[f"{n}:{d}"][d]
        drift = f"{label}: drift between branches (% of ‖θ_0‖)"
        changes[drift] = lambda res, drift=drift: measures(res, domains)[drift]
    others = list(runs)[1:]
    md += ["", f"Each setting − the first row ({settings[base_setting]}) on the same seed (points; mean over seeds "
           "[95% t-interval]):", "", "| setting | " + " | ".join(changes) + " |", "|---" * (len(changes) + 1) + "|"]
    md += [f"| {settings[s]} | " + " | ".join(cell([f(res) - f(base) for (res, _), (base, _) in zip(runs[s], runs[base_setting])])
                                              for f in changes.values()) + " |" for s in others]
    claims = {f"{settings[s]}: CoPD − mixed RLVR > 0": [x["CoPD − mixed RLVR"] for x in per[s]] for s in runs}
    claims.update({f"{settings[s]}: CoPD@equal − mixed RLVR > 0": [x["CoPD@equal − mixed RLVR"] for x in per[s]]
                   for s in runs})
    p = {c: p_value(v) for c, v in claims.items()}
    adjusted = holm(p)
    md += ["", f"CoPD against mixed RLVR in each setting (Holm's correction over these {len(claims)}):", "",
           "| claim | mean [95% interval] | p | verdict | Holm-adjusted p | Holm verdict |", "|---|---|---|---|---|---|"]
    for c, values in claims.items():
        mean, low, high = t_interval(values)
        held = "undecided" if adjusted[c] >= 0.05 else "holds" if mean > 0 else "fails"
        md.append(f"| {c} | {cell(values)} | {p[c]:.3f} | {verdict(low, high)} | {adjusted[c]:.3f} | {held} |")
    plot_probes({settings[s]: rs for s, rs in runs.items()}, domains, path + ".png")
    return md


def plot_probes(groups: dict, domains: list, path: str):
    """The merge probes of CoPD (the paper's budget), one line per group of runs (mean over seeds):
    the drift between the branches over training, the merged model's held-out accuracy over
    training, the accuracy along the line between the branches, and the merged model against the
    output ensemble and the branches."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (drift_ax, merged_ax, alpha_ax, bar_ax) = plt.subplots(1, 4, figsize=(17, 3.8))
    mean_of = lambda accs: 100 * sum(accs[d] for d in domains) / len(domains)
    for i, (label, rs) in enumerate(groups.items()):
        probes = [res.get("_merge_probes", {}).get("copd", {}) for res, _ in rs]
        if all(p.get("drift") for p in probes):
            pair = next(k for k in probes[0]["drift"][-1][1] if "base" not in k)
            drift_ax.plot(*_mean_curve([[(s, 100 * d[pair]) for s, d in p["drift"]] for p in probes]), marker=".",
                          color=f"C{i}", label=f"{label}: {pair}")
            drift_ax.plot(*_mean_curve([[(s, 50 * sum(v for k, v in d.items() if "base" in k)) for s, d in p["drift"]]
                                        for p in probes]), ":", color=f"C{i}", label=f"{label}: from π_0 (mean)")
        curves = [[(r["step"], mean_of({d: a["greedy"] for d, a in r["accuracy"].items()})) for r in rows
                   if r.get("kind") == "eval" and r["model"] == "copd" and not r["final"]] for _, rows in rs]
        if all(len(c) > 1 for c in curves):
            merged_ax.plot(*_mean_curve(curves), marker=".", color=f"C{i}", label=label)
        if all("interpolation" in p for p in probes):
            curve = [list(p["interpolation"].values())[0] for p in probes]
            alphas = [a for a, _ in curve[0]]
            alpha_ax.plot(alphas, [sum(mean_of(c[k][1]) for c in curve) / len(curve) for k in range(len(alphas))],
                          marker="o", color=f"C{i}", label=label)
        if all("ensemble" in p for p in probes):
            bars = {"branches, own domain": [100 * sum(res[f"copd:{d}"][d] for d in domains) / len(domains) for res, _ in rs],
                    "merged": [100 * res["copd"]["average"] for res, _ in rs],
                    "ensemble": [mean_of(p["ensemble"]) for p in probes]}
            for j, (what, values) in enumerate(bars.items()):
                bar_ax.bar(i + 0.27 * (j - 1), sum(values) / len(values), 0.25, color=f"C{j}",
                           label=what if i == 0 else None)
    bar_ax.set_xticks(range(len(groups)), list(groups), fontsize=6, rotation=15, ha="right")
    seeds = len(next(iter(groups.values())))
    for ax, title, x in ((drift_ax, "drift: L2 distance, % of ‖θ_0‖", "update"),
                         (merged_ax, "merged model, held-out %", "update"),
                         (alpha_ax, "(1−α)·θ_a + α·θ_b, held-out %", "α"),
                         (bar_ax, "held-out % (mean of domains)", "")):
        ax.set_title(f"{title} ({seeds} seed{'s' * (seeds > 1)})", fontsize=9), ax.set_xlabel(x), ax.legend(fontsize=6)
    _save_figure(fig, path)


def write_study_report(study: str, folders: dict, flags: dict, path: str):
    """The study's report (PATH.md, PATH.png) from its run folders {setting: [folder per seed]}
    and each setting's train.py flags {setting: {flag: value}}."""
    runs = {s: load_runs(f) for s, f in folders.items()}
    if study == "conflict":
        md = conflict_report({s: float(f.get("--rename-trade", 1)) for s, f in flags.items()}, runs, path)
    else:
        labels = {s: ", ".join(f"{k[2:]} {v}" for k, v in f.items() if k not in ("--method", "--rename-trade"))
                  or "β 1, rl-opd-ratio 1.5" for s, f in flags.items()}
        md = pull_report(labels, runs, path)
    md = [f"# Study: {study}", "", f"Runs: {', '.join(os.path.basename(f) for fs in folders.values() for f in fs)}.", "",
          *md, "", f"![merge probes]({os.path.basename(path)}.png)", ""]
    _atomic_write(path + ".md", "\n".join(md))
