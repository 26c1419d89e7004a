"""
The paper's claims, each a paired difference over seeds: CoPD against mixed RLVR, MOPD, each
direction of static OPD and each expert; merging adds (its Table 3); the branches' agreement.
Each claim gets its per-seed differences, a 95% t-interval with the seed as the unit, the
paired t-test's p, and a verdict beside the verdict after Holm's correction for the whole table.
"""

import math


# two-sided 95% quantiles of Student's t, by degrees of freedom (seeds − 1)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 29: 2.045}


def t_interval(diffs: list) -> tuple:
    """Mean and 95% t-interval of paired differences: mean ± t₀.₉₇₅,ₙ₋₁ · s/√n over the n seeds.
    The seed is the unit: it redraws π_0, the rollouts and the eval set's share of luck at once."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, float("-inf"), float("inf")
    sd = (sum((x - mean) ** 2 for x in diffs) / (n - 1)) ** 0.5
    t = T_975[max(k for k in T_975 if k <= n - 1)]      # a table gap rounds to the wider interval
    return mean, mean - t * sd / n ** 0.5, mean + t * sd / n ** 0.5


def paired_difference(right_a: str, right_b: str) -> tuple:
    """Two models on the same problems (results.json `_right`, "0110…"): the difference of their
    accuracies and two standard errors of it, in points; paired, so a problem both get right or
    both wrong adds no noise: 2·sd(a_i − b_i)/√n."""
    if len(right_a) != len(right_b) or not right_a:
        raise ValueError(f"paired over the same problems: {len(right_a)} against {len(right_b)}")
    d = [int(a) - int(b) for a, b in zip(right_a, right_b)]
    n, mean = len(d), sum(d) / len(d)
    sd = (sum((x - mean) ** 2 for x in d) / (n - 1)) ** 0.5 if n > 1 else float("inf")
    return 100 * mean, 200 * sd / n ** 0.5


def two_sided_p(t: float, df: int) -> float:
    """P(|T| ≥ |t|) for Student's t with an integer df, exactly (Abramowitz & Stegun 26.7.3-4):
    with θ = atan(|t|/√df), P(|T| < |t|) = sin θ·Σ (1·3⋯)/(2·4⋯) cos^(2k) θ for even df, and
    (2/π)(θ + sin θ·Σ (2·4⋯)/(3·5⋯) cos^(2k+1) θ) for odd df."""
    theta = math.atan(abs(t) / math.sqrt(df))
    sin, cos = math.sin(theta), math.cos(theta)
    total, term = 0.0, cos if df % 2 else 1.0
    for k in range(df % 2, df - 1, 2):
        total += term
        term *= (k + 1) / (k + 2) * cos * cos
    inside = 2 / math.pi * (theta + sin * total) if df % 2 else sin * total
    return max(0.0, 1.0 - inside)


def p_value(diffs: list) -> float:
    """The paired t-test's two-sided p-value of mean 0 (1.0 with fewer than two seeds)."""
    n = len(diffs)
    mean = sum(diffs) / n
    sd = (sum((x - mean) ** 2 for x in diffs) / (n - 1)) ** 0.5 if n > 1 else 0.0
    if n < 2:
        return 1.0
    if sd == 0:
        return 0.0 if mean != 0 else 1.0
    return two_sided_p(mean / (sd / n ** 0.5), n - 1)


def holm(p_values: dict) -> dict:
    """Holm's step-down adjustment: {claim: adjusted p}. Sorted ascending, the i-th of m
    p-values is multiplied by m − i and kept at least its predecessor's; any claim whose
    adjusted p is below 0.05 holds with the whole family's error rate at 5%."""
    adjusted, running = {}, 0.0
    order = sorted(p_values, key=p_values.get)
    for i, claim in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * p_values[claim]))
        adjusted[claim] = running
    return adjusted


def seed_of(rows: list, default):
    """The run's seed, from its log's config row (`default` for a log without one)."""
    for r in rows:
        if r.get("kind") == "config":
            return r.get("settings", {}).get("seed", default)
    return default


def final_overlap(rows: list, method: str, pairs: set | None = None) -> float | None:
    """Mean top-k overlap between the method's models (not π_0) at its last measurement, over
    `pairs` if given (so two methods are compared on the same pairs)."""
    last = {}
    for r in rows:
        if r.get("kind") == "divergence" and r["method"] == method and "base" not in r["pair"]:
            if pairs is None or r["pair"] in pairs:
                last[r["pair"]] = r["overlap"]
    return sum(last.values()) / len(last) if last else None


def linked_pairs(rows: list, method: str) -> set:
    return {r["pair"] for r in rows if r.get("kind") == "divergence" and r["method"] == method and "base" not in r["pair"]}


def run_differences(results: dict, rows: list, domains: list) -> dict:
    """{claim: difference in points} for one run, for the claims it can answer (all "A > B": an
    undecided test of one is not evidence that A and B are equal)."""
    claims = {"CoPD > mixed RLVR": ("copd", "mixed", "average"),
              "CoPD > MOPD": ("copd", "mopd", "average"),
              "CoPD at mixed RLVR's updates > mixed RLVR": ("copd@equal", "mixed", "average")}
    # the paper compares CoPD with each direction of static OPD, not with their mean
    claims.update({f"CoPD > static OPD {m[4:]}": ("copd", m, "average") for m in sorted(results) if m.startswith("opd:")})
    claims.update({f"CoPD > the {d} expert on {d}": ("copd", f"expert:{d}", d) for d in domains})
    # merging adds (the paper's Table 3): the merged model above each branch on that branch's domain
    claims.update({f"merging adds: CoPD > its {d} branch on {d}": ("copd", f"copd:{d}", d) for d in domains})
    out = {claim: 100 * (results[a][col] - results[b][col]) for claim, (a, b, col) in claims.items()
           if a in results and b in results}
    branches = [results[f"copd:{d}"]["average"] for d in domains if f"copd:{d}" in results]
    if "copd" in results and len(branches) == len(domains):
        out["merging adds: CoPD > its best branch, average"] = 100 * (results["copd"]["average"] - max(branches))
    # the branches' agreement at the experts' number of updates (copd@equal: T per branch), on the same pairs
    pairs = linked_pairs(rows, "copd@equal")
    ours, theirs = final_overlap(rows, "copd@equal", pairs), final_overlap(rows, "experts", pairs)
    if ours is not None and theirs is not None:
        out["overlap: CoPD branches > experts, same pairs at T updates"] = 100 * (ours - theirs)
    return out


def claim_differences(runs: list) -> dict:
    """{claim: per-seed differences in points}, for the claims every run can answer. Runs of one
    seed (replications) share π_0 and the eval problems: they are pooled into that seed's mean."""
    domains = [k for k in runs[0][0]["base"] if k != "average"]
    by_seed = {}
    for i, (results, rows) in enumerate(runs):
        by_seed.setdefault(seed_of(rows, f"run {i}"), []).append(run_differences(results, rows, domains))
    claims = [c for c in run_differences(runs[0][0], runs[0][1], domains)
              if all(c in d for reps in by_seed.values() for d in reps)]
    return {c: [sum(d[c] for d in reps) / len(reps) for reps in by_seed.values()] for c in claims}


def verdict(low: float, high: float) -> str:
    return "holds" if low > 0 else "fails" if high < 0 else "undecided"


def claims_table(runs: list, differences: dict | None = None) -> str:
    """Each claim: its per-seed paired differences (points), their mean with a 95% t-interval
    over seeds and the t-test's p; the verdict (holds: interval above 0, fails: below 0, else
    undecided) and the verdict after Holm's correction for testing every claim of the table."""
    differences = differences if differences is not None else claim_differences(runs)
    p = {claim: p_value(diffs) for claim, diffs in differences.items()}
    adjusted = holm(p)
    lines = ["| claim | per seed (points) | mean | 95% interval | p | verdict | Holm-adjusted p | Holm verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for claim, diffs in differences.items():
        mean, low, high = t_interval(diffs)
        held = "undecided" if adjusted[claim] >= 0.05 else "holds" if mean > 0 else "fails"
        lines.append(f"| {claim} | {', '.join(f'{d:+.1f}' for d in diffs)} | {mean:+.1f} | "
                     f"[{low:+.1f}, {high:+.1f}] | {p[claim]:.3f} | {verdict(low, high)} | {adjusted[claim]:.3f} | {held} |")
    return "\n".join(lines)
