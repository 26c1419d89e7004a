"""
The whole reproduction in one command: every method (`--method all`) on every seed of every
setting, and each setting's report as soon as its runs are done (the table over seeds, the
paper's claims with paired intervals, each method's compute, the plot).

    python reproduce.py                                   # text,image and text,image,video; seeds 0-4
    python reproduce.py --settings text,image --seeds 0,1,2 --lanes 2
    python reproduce.py --study conflict                  # video,rename at three levels of conflict
    python reproduce.py --study pull                      # CoPD's distillation pull: β and the OPD share

A setting is an --experts list and, after a space, any train.py flags for its runs
("video,rename --rename-trade 0.5"; a setting's --method replaces `all`). A study is a named
list of settings and one report over them (study.py). Runs go to
RUNS/<setting>-s<seed> (default runs/reproduction), the reports beside them (or to --docs):
reproduction-<setting>.md and .png, study-<study>.md and .png. Interrupt it and run the same command again: a
finished run is kept, an interrupted one resumes from its newest checkpoint, and one killed
before its first checkpoint starts over. `--lanes N` runs N jobs at a time, each with one
thread (on 2 cores two one-thread processes beat one two-thread process; more threads than
cores slow every run tenfold). With two lanes or more, a `--method all` run is two jobs, CoPD's
stages and the baselines, joined into RUNS/<setting>-s<seed> when both are done: the same
numbers bit for bit, and five seeds' work shared evenly by two lanes instead of three runs in one.
"""

import argparse
import glob
import gzip
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from checkpoint import list_checkpoints
from config import METHODS, UsageError, parse_args, presets
from settings import apply_flags, steps_of
from claims import claims_table
from report import budgets, compute_table, describe_lr, load_runs, plot_reproduction, summary_table, write_results
from tasks import DOMAINS
from warmstart import pi0_cached, pi0_name

HERE = os.path.dirname(os.path.abspath(__file__))


# the studies (study.py reports them): the conflict dose-response, video ~ rename with rename's
# name trade on a share p of its clips; and the distillation pull at p = 1, β and S_RL : S_OPD,
# against the conflict study's p = 1 runs (β = 1, 1.5 : 1)
STUDIES = {
    "conflict": [f"video,rename --rename-trade {p}" for p in ("0", "0.5", "1")],
    "pull": ["video,rename --rename-trade 1"] + [f"video,rename --method copd+equal {knob}" for knob in
                                                 ("--opd-beta 4", "--opd-beta 16", "--rl-opd-ratio 1", "--rl-opd-ratio 0.5")],
}


def parse_setting(setting: str) -> tuple:
    """'video,rename --rename-trade 0.5' -> ('video,rename', ['--rename-trade', '0.5'])."""
    experts, *flags = shlex.split(setting)
    return experts, flags


def folder_name(setting: str) -> str:
    """A setting as a folder name: 'video,rename --rename-trade 0.5' -> 'video+rename_rename-trade=0.5'."""
    experts, flags = parse_setting(setting)
    name = experts.replace(",", "+")
    for flag in flags:
        name += f"_{flag[2:]}" if flag.startswith("--") else f"={flag}"
    return re.sub(r"[^\w.+=@-]", "_", name)


OWN_FLAGS = ("--experts", "--seed", "--out", "--preset", "--resume", "--overwrite", "--steps")


def check_setting(setting: str, preset: str) -> str | None:
    """Why a setting's runs would stop at train.py's checks (an unknown flag, a bad value), or None."""
    try:
        experts, flags = parse_setting(setting)
        owned = [f for f in flags if f.split("=")[0] in OWN_FLAGS]
        if owned:
            raise UsageError(f"{', '.join(owned)}: reproduce.py sets these for every run")
        args = parse_args(["--experts", experts, "--method", "all", "--preset", preset, *flags])
        unknown = [d for d in experts.split(",") if d not in DOMAINS] + [m for m in [args.method] if m not in METHODS]
        if unknown:
            raise UsageError(f"unknown domain or method {', '.join(unknown)}")
        apply_flags(presets()[preset], args, len(experts.split(",")))
    except (UsageError, ValueError) as e:
        return f"setting '{setting}': {e}"
    return None


def command(setting: str, seed: int, out: str, preset: str, extra: list, method: str = "all") -> list:
    """train.py's command line for one run (or one part of a run): fresh, resumed or started over."""
    experts, flags = parse_setting(setting)
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--experts", experts, "--method", method,
           "--preset", preset, "--seed", str(seed), "--out", out, *flags, *extra]
    if list_checkpoints(out):
        return cmd + ["--resume"]
    if os.path.isdir(out) and os.listdir(out):   # killed before its first checkpoint
        return cmd + ["--overwrite"]
    return cmd


# glibc hands freed tensor memory back to the system and page-faults it in again at the next
# step (one reproduction: 36 million minor faults); these keep it for the process: six times
# fewer faults, 4% less time (README, Performance), the same results bit for bit. A value
# the user set wins.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def one_thread(cmd: list, log_path: str) -> tuple:
    """A one-thread process, its output appended to LOG_PATH; (seconds, exit code)."""
    started = time.time()
    with open(log_path, "a") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                              env={**KEEP_FREED_MEMORY, **os.environ, "OMP_NUM_THREADS": "1"}, cwd=HERE).returncode
    return time.time() - started, code


def build_pi0(seed: int, preset: str, log_path: str) -> tuple:
    """One seed's π_0 into the cache that train.py reads; (seconds, exit code)."""
    return one_thread([sys.executable, os.path.join(HERE, "warmstart.py"), "--preset", preset, "--seed", str(seed)],
                      log_path)


def finished(out: str) -> bool:
    """A run's results.json is written last: its folder holds a finished run."""
    return os.path.isfile(os.path.join(out, "results.json"))


def stored_pi0(out: str) -> str | None:
    """The π_0 a finished run started from (results.json `_pi0`; None for runs older than that record)."""
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f).get("_pi0")


def stored_steps(out: str) -> int | None:
    """T of a finished run: the preset's steps as the run resolved them, from its log's config
    row (metrics.jsonl, or metrics.jsonl.gz as the runs kept in docs/runs)."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        path += ".gz"
    try:
        with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
            for line in f:
                row = json.loads(line)
                if row.get("kind") == "config":
                    return row["settings"]["preset"]["steps"]
    except (OSError, ValueError, KeyError):
        pass
    return None


def run_one(setting: str, seed: int, out: str, preset: str, extra: list, method: str = "all") -> tuple:
    """One run as a one-thread process, its output in OUT.log; (out, seconds, exit code)."""
    if finished(out):
        return out, 0.0, 0
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    return (out, *one_thread(command(setting, seed, out, preset, extra, method), out + ".log"))


# A `--method all` run is two jobs, so that one seed's work can fill both lanes: CoPD's two
# stages, and the baselines. CoPD draws every random number from seeds of its own
# (copd.branch_seed, the evaluations' seeds), so its stages give the same numbers bit for bit
# with or without the baselines before them in one process; joined, the parts are the run.
PARTS = {"copd": "copd+equal", "baselines": "baselines"}      # the longer first: the lanes end together
assert set(METHODS["copd+equal"].stages + METHODS["baselines"].stages) == set(METHODS["all"].stages)


def part_folder(out: str, part: str) -> str:
    return f"{out}.{part}"


def jobs_of(setting: str, out: str, lanes: int) -> list:
    """The lanes' jobs for one run, as (folder, --method): a finished run kept, a run of the
    setting's own --method, or any run with one lane, whole; else its parts."""
    if finished(out) or "--method" in parse_setting(setting)[1] or lanes == 1:
        return [(out, "all")]
    return [(part_folder(out, part), method) for part, method in PARTS.items()]


def join_parts(out: str):
    """Write OUT, the `--method all` run, from its finished parts (`part_folder`): results.json
    merged, metrics.jsonl the baselines' log then CoPD's (π_0's evaluation once; each part's
    config line), results.md and curves.png drawn from them, CoPD's branches copied in, the
    parts' logs one after the other in OUT.log; then the parts are removed. OUT's results.json
    is written last: an interrupted join is done again from the parts."""
    parts = [part_folder(out, p) for p in ("baselines", "copd")]
    (results, rows), (copd, copd_rows) = load_runs(parts)
    config, copd_config = (next(r for r in log if r.get("kind") == "config") for log in (rows, copd_rows))
    flags = lambda config: {k: v for k, v in config["recorded"].items() if k != "--method"}
    if flags(config) != flags(copd_config) or results["base"] != copd["base"] or results["_pi0"] != copd["_pi0"]:
        raise ValueError(f"{parts[0]} and {parts[1]} are not parts of one run: their flags, π_0 or π_0's "
                         "evaluation differ")
    # write_results adds these again at the end, from the joined log
    results = {k: v for k, v in results.items() if k not in ("_compute", "_divergence_cost")}
    for key, value in copd.items():
        if key in ("_compute", "_divergence_cost"):
            continue
        if key not in results:
            results[key] = value
        elif key == "_machine":
            results[key] = results[key] + [m for m in value if m not in results[key]]
        elif key.startswith("_") and isinstance(value, dict):
            results[key] = {**results[key], **{k: v for k, v in value.items() if k not in results[key]}}
    rows = rows + [r for r in copd_rows if r.get("model") != "base"]   # each part's config line stays
    curves, divergence = {}, {}
    for r in rows:
        if r.get("kind") == "eval" and not r["final"]:
            curves.setdefault(r["model"], []).append((r["step"], {d: a["greedy"] for d, a in r["accuracy"].items()}))
        elif r.get("kind") == "divergence":
            measured = {k: v for k, v in r.items() if k not in ("kind", "method", "pair", "step", "time")}
            divergence.setdefault(r["method"], {}).setdefault(r["pair"], []).append((r["step"], measured))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    for branches in glob.glob(os.path.join(parts[1], "*-branches")):
        shutil.copytree(branches, os.path.join(out, os.path.basename(branches)), dirs_exist_ok=True)
    s, preset = config["settings"], config["settings"]["preset"]
    domains = list(s["experts"])
    write_results(out, results, domains, curves, divergence,
                  title=f"--experts {','.join(domains)} --method all --preset {s['preset_name']} --seed {s['seed']}",
                  eval_size=results["_eval_problems"][domains[0]], budget=budgets(len(domains), preset["steps"], s["model"]),
                  learning_rate=describe_lr(preset["lr"], preset["lr_schedule"], preset["min_lr_frac"]))
    logs = [p + ".log" for p in parts if os.path.isfile(p + ".log")]
    with open(out + ".log", "w") as log:
        for path in logs:
            with open(path) as f:
                log.write(f.read())
    for part in parts:
        shutil.rmtree(part)
    for path in logs:
        os.remove(path)


def write_report(folders: list, path: str, title: str):
    """The setting's report, written whole: markdown and plot."""
    runs = load_runs(folders)
    results = runs[0][0]
    problems = min(results["_eval_problems"].values())
    md = [f"# Reproduction: {title}", "",
          f"Runs: {', '.join(os.path.basename(f) for f in folders)}. Held-out greedy accuracy (%), "
          f"{problems:,} distinct problems per domain, the mean over seeds ± the half-width of its 95% t-interval:", "", summary_table(runs), "",
          "The paper's claims: the difference (points) of each seed's pair of models, its mean, and a 95% "
          "t-interval over seeds (the seed redraws π_0, the rollouts and the eval luck at once):", "",
          claims_table(runs), "", "Compute of each method (updates and tokens: the first seed's run; every seed takes the same "
          "updates, and tokens vary with the responses' lengths. Wall time: the median over seeds, "
          "each run in a one-thread lane):", "", compute_table([r for r, _ in runs]), "",
          f"![accuracy and overlap]({os.path.basename(path)}.png)", ""]
    plot_reproduction(runs, path + ".png")
    tmp = path + ".md.tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(md))
    os.replace(tmp, path + ".md")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--settings", default="text,image;text,image,video",
                    help="';'-separated settings: an --experts list, then any train.py flags "
                         "(default 'text,image;text,image,video')")
    ap.add_argument("--study", default=None, help=f"run a study's settings and report it: {' | '.join(STUDIES)}")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default 0-4)")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--lanes", type=int, default=2, help="runs at a time, one thread each (default 2)")
    ap.add_argument("--runs", default="runs/reproduction", help="where the runs go")
    ap.add_argument("--docs", default=None, help="where the reports go (default: the --runs folder)")
    ap.add_argument("--steps", type=int, default=None, help="T, passed to train.py (default: the preset's)")
    a = ap.parse_args(argv)
    docs = a.docs or a.runs
    if a.study is not None and a.study not in STUDIES:
        print(f"error: --study must be one of {', '.join(STUDIES)}, got '{a.study}'", file=sys.stderr)
        return 2
    settings = STUDIES[a.study] if a.study else [s.strip() for s in a.settings.split(";") if s.strip()]
    if not settings:
        print(f"error: --settings names no setting, got '{a.settings}'", file=sys.stderr)
        return 2
    try:
        seeds = [int(s) for s in a.seeds.split(",")]
    except ValueError:
        print(f"error: --seeds takes comma-separated integers, got '{a.seeds}'", file=sys.stderr)
        return 2
    for s in settings:
        why = check_setting(s, a.preset if a.preset in presets() else "cpu")
        if why:
            print(f"error: {why}", file=sys.stderr)
            return 2
    names = [folder_name(s) for s in settings]
    if len(set(seeds)) != len(seeds) or len(set(names)) != len(names):
        print(f"error: --seeds and --settings list each value once (two runs of one seed would share one "
              f"folder), got --seeds {a.seeds} --settings '{a.settings}'", file=sys.stderr)
        return 2
    if a.steps is not None and a.steps < 1:
        print(f"error: --steps must be at least 1, got {a.steps}", file=sys.stderr)
        return 2
    if a.lanes < 1:
        print(f"error: --lanes must be at least 1, got {a.lanes}", file=sys.stderr)
        return 2
    if a.preset not in presets():
        print(f"error: --preset must be one of {', '.join(presets())}, got '{a.preset}'", file=sys.stderr)
        return 2
    for path, flag in ((a.runs, "--runs"), (docs, "--docs")):
        above = os.path.abspath(path)
        while not os.path.exists(above):
            above = os.path.dirname(above)
        if not os.path.isdir(above):
            print(f"error: {flag} {path}: {above} is a file, not a folder", file=sys.stderr)
            return 2
    extra = ["--steps", str(a.steps)] if a.steps else []
    # a study runs seed by seed (every setting of seed 0 first): its paired comparisons fill in
    # as it goes; a reproduction setting by setting, so each setting's report comes early
    order = [(s, seed) for seed in seeds for s in settings] if a.study else [(s, seed) for s in settings for seed in seeds]
    jobs = [(setting, seed, os.path.join(a.runs, f"{folder_name(setting)}-s{seed}")) for setting, seed in order]

    def report(setting: str):
        """A setting's report, as soon as its last run finishes (the others may still be running)."""
        os.makedirs(docs, exist_ok=True)
        path = os.path.join(docs, f"reproduction-{folder_name(setting)}")
        experts, flags = parse_setting(setting)
        method = [] if "--method" in flags else ["--method", "all"]
        write_report([out for e, _, out in jobs if e == setting], path,
                     f"{shlex.join(['--experts', experts, *method, '--preset', a.preset, *flags])}, seeds {a.seeds}")
        print(f"wrote {path}.md and {path}.png", flush=True)

    preset = presets()[a.preset]
    stale = [out for _, seed, out in jobs if finished(out) and
             stored_pi0(out) != pi0_name(preset.tiny, preset.warm, seed)]
    if stale:
        print(f"error: {len(stale)} finished run(s) in {a.runs} started from another π_0 than the {a.preset} preset's "
              f"now (an older recipe): {', '.join(stale)}; move them away, or pass another --runs", file=sys.stderr)
        return 2
    # T moved with the preset (300 before the cpu preset's 180): a finished run of another T is
    # another experiment, never this one's
    budget = {s: steps_of(preset, len(parse_setting(s)[0].split(",")), a.steps) for s in settings}
    stored = {out: stored_steps(out) for _, _, out in jobs if finished(out)}
    other_t = [f"{out} (T = {stored[out]})" for setting, _, out in jobs if out in stored and stored[out] != budget[setting]]
    if other_t:
        print(f"error: {len(other_t)} finished run(s) in {a.runs} trained another T than this reproduction's "
              f"({', '.join(f'{s}: T = {t}' for s, t in budget.items())}): {', '.join(other_t)}; move them away, "
              f"pass another --runs, or ask for their T with --steps", file=sys.stderr)
        return 2
    missing = [seed for seed in seeds if not pi0_cached(preset.tiny, preset.warm, seed)[1]
               and any(not finished(out) for _, s, out in jobs if s == seed)]
    built = {seed: threading.Event() for seed in missing}
    started = time.time()
    stamp = lambda: f"[{(time.time() - started) / 60:5.1f} min]"

    def pi0_job(seed: int):
        try:
            os.makedirs(a.runs, exist_ok=True)
            log = os.path.join(a.runs, f"pi0-s{seed}.log")
            took, code = build_pi0(seed, a.preset, log)
            print(f"{stamp()} π_0 of seed {seed}: " + (f"{took / 60:.1f} min" if code == 0 else f"failed (exit {code}), see {log}"),
                  flush=True)
        finally:
            built[seed].set()   # a failed build fails its runs, in their own logs

    def run_job(setting: str, seed: int, out: str, method: str):
        if seed in built:
            built[seed].wait()
        return run_one(setting, seed, out, a.preset, extra, method)

    work = [(setting, seed, out, job_out, method) for setting, seed, out in jobs
            for job_out, method in jobs_of(setting, out, a.lanes)]
    # every π_0 is queued before every run; the pool takes the work in order
    with ThreadPoolExecutor(a.lanes) as pool:
        for seed in missing:
            pool.submit(pi0_job, seed)
        futures = {pool.submit(run_job, setting, seed, job_out, method): (setting, out)
                   for setting, seed, out, job_out, method in work}
        for done, future in enumerate(as_completed(futures), 1):
            job_out, took, code = future.result()
            state = "kept" if took == 0 else f"{took / 60:.1f} min" if code == 0 else f"failed (exit {code}), see {job_out}.log"
            print(f"{stamp()} {done}/{len(work)} {job_out}: {state}", flush=True)
            setting, out = futures[future]
            if job_out != out and not finished(out) and all(finished(part_folder(out, p)) for p in PARTS):
                try:
                    join_parts(out)
                    print(f"{stamp()} joined {out}", flush=True)
                except (ValueError, FileNotFoundError, OSError) as e:
                    print(f"error: {out}: {e}", file=sys.stderr, flush=True)
            if code == 0 and all(finished(o) for e, _, o in jobs if e == setting):
                report(setting)
    failed = [out for _, _, out in jobs if not finished(out)]
    if failed:
        print(f"error: {len(failed)} run(s) did not finish: {', '.join(failed)}; run the same command again "
              "to resume them", file=sys.stderr)
        return 1
    if a.study:
        import study   # read when the runs are done: a study's report is the code's of that moment
        path = os.path.join(docs, f"study-{a.study}")
        flags = {s: dict(zip(parse_setting(s)[1][::2], parse_setting(s)[1][1::2])) for s in settings}
        study.write_study_report(a.study, {s: [o for e, _, o in jobs if e == s] for s in settings}, flags, path)
        print(f"wrote {path}.md and {path}.png", flush=True)
    print(f"reproduction done in {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
