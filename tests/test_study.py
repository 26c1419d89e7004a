import json

from study import measures, slope, write_study_report

DOMAINS = ("video", "rename")


def fake_run(folder, seed, p=1.0, copd_lead=0.0, with_baselines=True):
    """A finished video ~ rename run whose numbers follow p: mixed loses 10·p points to each
    expert, CoPD leads mixed by `copd_lead` + 5·p, its merge loses 2 points to its branches."""
    folder.mkdir(parents=True)
    acc = lambda v, r: {"video": v, "rename": r, "average": (v + r) / 2}
    expert, mixed = 0.5 + 0.01 * seed, 0.5 + 0.01 * seed - 0.1 * p
    copd = mixed + copd_lead + 0.05 * p
    results = {"base": acc(0.4, 0.4), "copd": acc(copd, copd), "copd:video": acc(copd + 0.02, 0.3),
               "copd:rename": acc(0.3, copd + 0.02), "copd@equal": acc(copd - 0.01, copd - 0.01),
               "copd@equal:video": acc(copd, 0.3), "copd@equal:rename": acc(0.3, copd),
               "_merge_probes": {name: {"drift": [[0, {"rename~video": 0.0, "video~base": 0.0, "rename~base": 0.0}],
                                                  [10, {"rename~video": 0.04, "video~base": 0.03, "rename~base": 0.03}]],
                                        "ensemble": {"video": copd + 0.01, "rename": copd + 0.01},
                                        "interpolation": {"rename~video": [[a, {"video": copd, "rename": copd}]
                                                                           for a in (0, 0.25, 0.5, 0.75, 1)]}}
                                 for name in ("copd", "copd@equal")}}
    if with_baselines:
        results.update({"expert:video": acc(expert, 0.3), "expert:rename": acc(0.3, expert), "mixed": acc(mixed, mixed),
                        "mopd": acc(mixed - 0.01, mixed - 0.01), "_grad_cosine": {"rename~video": 0.1 * p}})
    (folder / "results.json").write_text(json.dumps(results))
    rows = [{"kind": "config", "settings": {"seed": seed}}]
    rows += [{"kind": "eval", "model": "copd", "step": s, "final": False,
              "accuracy": {d: {"greedy": copd} for d in DOMAINS}} for s in (0, 10)]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(folder)


def test_measures_are_the_paired_differences_in_points(tmp_path):
    r = json.loads(open(fake_run(tmp_path / "r", 0, p=1.0) + "/results.json").read())
    m = measures(r, list(DOMAINS))
    assert round(m["mixed − expert on video"], 6) == -10.0 and round(m["CoPD − mixed RLVR"], 6) == 5.0
    assert round(m["CoPD: merged − branch, own domain"], 6) == -2.0
    assert round(m["CoPD: ensemble − merged"], 6) == 1.0 and round(m["CoPD: drift between branches (% of ‖θ_0‖)"], 6) == 4.0
    assert slope([0, 0.5, 1], [1.0, 2.0, 3.0]) == 2.0


def test_the_conflict_report_finds_the_slopes_it_was_given(tmp_path):
    folders = {f"video,rename --rename-trade {p}": [fake_run(tmp_path / f"{p}-{s}", s, float(p)) for s in range(3)]
               for p in ("0", "0.5", "1")}
    flags = {s: {"--rename-trade": s.split()[-1]} for s in folders}
    write_study_report("conflict", folders, flags, str(tmp_path / "study"))
    md = (tmp_path / "study.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| mixed − expert on video falls"))
    assert "-10.0 [-10.0, -10.0]" in row and row.split(" | ")[4] == "holds"       # the slope, and its verdict
    row = next(line for line in md.splitlines() if line.startswith("| CoPD − mixed RLVR |"))
    assert row.split(" | ")[1].startswith("+0.0") and row.split(" | ")[3].startswith("+5.0")
    assert (tmp_path / "study.png").stat().st_size > 1000


def test_the_pull_report_compares_each_setting_with_the_baselines_of_its_seed(tmp_path):
    base = "video,rename --rename-trade 1"
    folders = {base: [fake_run(tmp_path / f"b{s}", s) for s in range(3)],
               "video,rename --method copd+equal --opd-beta 4": [fake_run(tmp_path / f"v{s}", s, copd_lead=0.03,
                                                                           with_baselines=False) for s in range(3)]}
    flags = {base: {"--rename-trade": "1"}, "video,rename --method copd+equal --opd-beta 4": {"--method": "copd+equal",
                                                                                             "--opd-beta": "4"}}
    write_study_report("pull", folders, flags, str(tmp_path / "pull"))
    md = (tmp_path / "pull.md").read_text().split("Each setting − the first row")[0]
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| β 1") or line.startswith("| opd-beta 4")}
    assert rows["β 1, rl-opd-ratio 1.5"].split(" | ")[1].startswith("+5.0")
    assert rows["opd-beta 4"].split(" | ")[1].startswith("+8.0")                  # mixed from the same seed's baseline


def test_the_pull_report_gives_each_setting_minus_the_baseline_of_its_seed(tmp_path):
    base, stronger = "video,rename --rename-trade 1", "video,rename --method copd+equal --opd-beta 4"
    folders = {base: [fake_run(tmp_path / f"b{s}", s) for s in range(3)],
               stronger: [fake_run(tmp_path / f"v{s}", s, copd_lead=0.03, with_baselines=False) for s in range(3)]}
    flags = {base: {"--rename-trade": "1"}, stronger: {"--method": "copd+equal", "--opd-beta": "4"}}
    write_study_report("pull", folders, flags, str(tmp_path / "pull"))
    md = (tmp_path / "pull.md").read_text().split("Each setting − the first row")[1]
    header = next(line for line in md.splitlines() if line.startswith("| setting"))
    row = next(line for line in md.splitlines() if line.startswith("| opd-beta 4"))
    change = dict(zip(header.split(" | ")[1:], row.split(" | ")[1:]))
    assert change["CoPD: merged"].startswith("+3.0") and change["CoPD: video branch on video"].startswith("+3.0")
    assert change["CoPD: drift between branches (% of ‖θ_0‖)"].startswith("+0.0")
