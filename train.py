"""
Train and compare: CoPD against RLVR experts, mixed RLVR, static OPD and multi-teacher OPD,
from one base policy π_0, with the paper's step budgets (K experts of T steps; mixed RLVR and
each CoPD branch K·T steps).

    python train.py --experts text,image                       # CoPD (the default method)
    python train.py --experts text --method rlvr --preset cpu  # one GRPO expert
    python train.py --experts text,image --method all          # every method, then the table

Writes OUT/metrics.jsonl (one JSON object per step and eval), OUT/results.json (method ->
domain -> held-out greedy accuracy, with "average"), OUT/results.md (the table, budgets and
seed) and OUT/curves.png.

OUT/<stage>-branches/ holds a CoPD stage's final branches. Where this implementation departs
from the paper, on purpose (the learning rate, the scale, the loss aggregation, and what the
paper leaves unstated): README.md, "Where this departs from the paper".
"""

import os
import random
import shlex
import shutil
import sys
import time

import torch

import parallel
from checkpoint import FolderInUse, clear_run, hold_folder, list_checkpoints
from config import METHODS, UsageError, parse_args
from settings import check_context, validate
from copd import PHASE_I, Branches, CoPDConfig, budget_schedule, describe, neighbours, schedule
from memory import clone_policy, memory_plan
from opd import divergence, opd_step
from policy import encode_prompt
from probes import ensemble_accuracy, interpolation_curve
from report import budgets, describe_lr, results_table, write_results
from rlvr import grad_cosine, rlvr_step
from run import Run, TrainingError, unwritable
from tasks import DataError, load_domain
from warmstart import ModelError, load_pi0


# -----------------------------------------------------------------------------
# one model, trained by a fixed loop: every expert, mixed RLVR, static OPD, MOPD

def train_loop(run: Run, name: str, model, steps: int, step, desc: str):
    """`steps` updates of `step(model, optimizer) -> stats`, with the evals, the log, the
    non-finite guard and the checkpoints; resumes where a checkpoint left the loop."""
    opt = run.optimizer(model)
    start = run.begin_loop(name, {name: model}, {name: opt})
    if start == 0:
        run.evaluate({name: model}, 0)
    for t in run.progress(range(start + 1, steps + 1), initial=start, total=steps, desc=f"{name} ({desc})"):
        lr = run.set_lr([opt], t, steps)
        stats = step(model, opt)
        run.log(kind="train", model=name, step=t, lr=lr, **stats)
        run.check_finite(name, t, stats)
        if t % run.preset.eval_every == 0 or t == steps:
            run.evaluate({name: model}, t)
        run.end_of_step(name, t, {name: model}, {name: opt})
    return model


def rlvr(run: Run, domains: list):
    """A GRPO step on the union of `domains` (Eq. 7): one domain, an expert; all, mixed RLVR."""
    n = run.preset.rl.prompts_per_step
    return lambda model, opt: rlvr_step(model, opt, run.proc, run.prompts(domains[0], n) if len(domains) == 1
                                        else run.mixed_prompts(n), run.preset.rl)


def distill(run: Run, teachers: dict, domains: list):
    """An OPD step from fixed teachers {domain: model}, each on its own domain's prompts (Eq. 1/4)."""
    n = run.preset.opd.prompts_per_step
    return lambda model, opt: opd_step(model, opt, teachers, run.proc, run.prompts(domains[0], n) if len(domains) == 1
                                       else run.mixed_prompts(n), run.preset.rl, run.preset.opd)


def stage(run: Run, name: str, train, steps: int, keep: bool = False):
    """One trained model as a stage: `train()`, its final evaluation into the results, and the
    stage marked finished (a resumed run skips it; `keep`: later stages need the model)."""
    if run.pending(name):
        model = train()
        run.record(name, run.evaluate({name: model}, steps, final=True)[name], steps)
        run.finish(name, **({name: model} if keep else {}))


def log_divergence(run: Run, method: str, step: int, student, teacher, pair: str, domain: str):
    """Top-k overlap (Eq. 6) and symmetric KL of two policies on the student's own rollouts."""
    examples = run.heldout[domain][:run.preset.divergence_prompts]
    div = divergence(student, teacher, run.proc, examples, run.preset.rl, run.preset.opd.overlap_k)
    run.log(kind="divergence", method=method, pair=pair, step=step, **div)
    run.divergence.setdefault(method, {}).setdefault(pair, []).append((step, div))


# -----------------------------------------------------------------------------
# the baselines

def base_stage(run: Run, layout=None):
    """π_0's evaluation; before mixed RLVR, also the gradient conflict between the domains on π_0."""
    if run.pending("base"):
        run.record("base", run.evaluate({"base": run.model0}, 0, final=True)["base"])
        if len(run.domains) >= 2 and "mixed" in METHODS[run.settings.method].stages:
            prompts = {d: run.prompts(d, run.preset.rl.prompts_per_step) for d in run.domains}
            run.results["_grad_cosine"] = grad_cosine(clone_policy(run.model0), run.proc, prompts, run.preset.rl)
        run.finish("base")


def train_experts(run: Run, layout=None) -> dict:
    """One GRPO expert per domain, each a stage of its own (so a resumed run keeps them)."""
    T = run.preset.steps
    for d in run.domains:
        name = f"expert:{d}"
        stage(run, name, lambda: train_loop(run, name, clone_policy(run.model0), T, rlvr(run, [d]), "GRPO"), T, keep=True)
    experts = {d: run.models[f"expert:{d}"] for d in run.domains}
    if run.pending("experts"):
        for a, b in [(a, b) for a in run.domains for b in run.domains if a < b]:
            # the drift of independently trained experts, for contrast with CoPD's branches
            log_divergence(run, "experts", T, experts[a], experts[b], f"{a}~{b}", a)
        for d in run.domains:
            log_divergence(run, "experts", T, experts[d], run.model0, f"{d}~base", d)
        own = {d: run.results[f"expert:{d}"][d] for d in run.domains}   # each expert on its own domain
        row = "experts" if run.settings.method != "rlvr" else "rlvr"
        run.results[row] = {**own, "average": round(sum(own.values()) / len(own), 4)}
        right = run.results.get("_right", {})
        if all(f"expert:{d}" in right for d in run.domains):
            right[row] = {d: right[f"expert:{d}"][d] for d in run.domains}
        run.finish("experts")
    return experts


def mixed_rlvr(run: Run, layout=None):
    """GRPO on the union of every domain, K·T steps (the experts' total)."""
    KT = len(run.domains) * run.preset.steps
    stage(run, "mixed", lambda: train_loop(run, "mixed", clone_policy(run.model0), KT, rlvr(run, run.domains), "GRPO"), KT)


def static_opd(run: Run, layout=None):
    """Each finished expert distilled into a neighbour's: the student is expert b, taught by
    expert a on a's domain for T steps; each direction a row of its own."""
    experts, T = train_experts(run), run.preset.steps
    directions = [(a, b) for b in run.domains for a in neighbours(run.domains)[b]]
    for a, b in directions:
        name = f"opd:{a}->{b}"
        stage(run, name, lambda: train_loop(run, name, clone_policy(experts[b]), T, distill(run, {a: experts[a]}, [a]),
                                            "OPD"), T)
    # the summary row: the mean over directions (the paper reports each; so do we)
    rows = [run.results[f"opd:{a}->{b}"] for a, b in directions]
    run.results["opd"] = {d: round(sum(r[d] for r in rows) / len(rows), 4) for d in run.domains}
    run.results["opd"]["average"] = round(sum(run.results["opd"].values()) / len(run.domains), 4)


def mopd(run: Run, layout=None):
    """Multi-teacher OPD: π_0 learns every domain from its expert, K·T steps (as one CoPD
    branch: the student has K domains to learn, as a branch does)."""
    experts, KT = train_experts(run), len(run.domains) * run.preset.steps
    stage(run, "mopd", lambda: train_loop(run, "mopd", clone_policy(run.model0), KT, distill(run, experts, run.domains),
                                          "OPD"), KT)


# -----------------------------------------------------------------------------
# CoPD (the paper's Algorithm 1)

def train_copd(run: Run, layout=None, name: str = "copd", updates: int | None = None):
    """K branches from π_0; N cycles of Phase I (S_RL steps of GRPO on each branch's own domain)
    and Phase II (S_OPD steps of GRPO + OPD from the neighbouring branches, in one update);
    `updates` per branch: K·T, the paper's, or T for "copd@equal" (the K branches together take
    mixed RLVR's K·T). All branches in this process (copd.Branches), or under torchrun (`layout`)
    this rank's branch (parallel.RankBranches): the loop is the same."""
    K, T = len(run.domains), run.preset.steps
    updates = updates or K * T
    cycles = max(1, min(run.preset.cycles, updates // 2))   # a cycle holds at least one step of each phase
    rl_steps, opd_steps = budget_schedule(updates, cycles, run.preset.rl_opd_ratio)
    cfg = CoPDConfig(cycles=cycles, rl_steps=rl_steps, opd_steps=opd_steps, topology=run.settings.topology)
    if run.writer:
        print(describe(cfg, run.domains), flush=True)
    teachers_of = neighbours(run.domains, cfg.topology, cfg.hub)
    branches = (parallel.RankBranches(layout, run.model0, teachers_of, run.optimizer, name, run.train_pool) if layout
                else Branches(run.model0, run.domains, teachers_of, run.optimizer, name))
    models, optimizers = branches.by_name()
    steps = schedule(cfg)
    start = run.begin_loop(name, models, optimizers)
    if start == 0:
        run.evaluate(models, 0, branches=branches)
        probe_merge(run, name, 0, branches)
    rl, opd = run.preset.rl, run.preset.opd
    for i, (cycle, phase, in_phase) in enumerate(run.progress(steps, desc=name), 1):
        if i <= start:
            continue
        lr = run.set_lr(optimizers.values(), i, len(steps))
        # (a) every branch k samples its GRPO batch on D_k and, in Phase II, its own rollouts on
        # each neighbour j's prompts, before any branch moves
        own = branches.sample(run.proc, run.train_pool, phase, rl, opd, step_seed=f"{run.settings.seed}:{name}:{i}")
        if phase == PHASE_I:
            grades = {d: {} for d in own}
        else:   # (b) Phase II: neighbour j grades k's rollouts, log π^(j)(y_t), with its weights at step start
            grades = branches.grade(run.proc, own, rl, opd)
        # (c) one update per branch: the GRPO advantages (Eq. 7) and, in Phase II, the cross-branch
        # advantages Â_t = β·(log π^(j)(y_t) − log π^(k)(y_t)) (Eq. 8) in one clipped surrogate
        stats = branches.update(run.proc, own, grades, rl, opd)
        for d, s in stats.items():
            run.log(kind="train", model=f"{name}:{d}", step=i, cycle=cycle, phase=phase, lr=lr, **s)
            run.check_finite(f"{name}:{d}", i, s)
        if i % run.preset.divergence_every == 0 or i == len(steps):
            for pair, student, teacher, domain in branches.divergence_pairs(run.model0):
                log_divergence(run, name, i, student, teacher, pair, domain)
        if i % run.preset.eval_every == 0:
            run.evaluate(models, i, branches=branches)
            probe_merge(run, name, i, branches)
        run.end_of_step(name, i, models, optimizers, where=f"{name} cycle {cycle} {phase} step {in_phase + 1} (update {i})")
    return branches


def copd(run: Run, layout=None, name: str = "copd", updates: int | None = None):
    """CoPD as a stage: train the branches, evaluate each, then their uniform average (the
    all-in-one model)."""
    if run.pending(name):
        updates = updates or len(run.domains) * run.preset.steps
        branches = train_copd(run, layout, name, updates)
        merged = branches.merge()
        for branch, accs in run.evaluate(branches.by_name()[0], updates, final=True, branches=branches).items():
            run.record(branch, accs, updates)
        run.record(name, run.evaluate({name: merged}, updates, final=True, branches=branches)[name], updates)
        final_probes(run, name, branches)
        run.finish(name)


# -----------------------------------------------------------------------------
# the merge probes (probes.py): why the all-in-one model wins or loses

def probe_merge(run: Run, name: str, step: int, branches):
    """At an evaluation of the branches: the merged model's held-out accuracy (a curve of its own,
    `name`) and the branches' drift, apart and from π_0."""
    started = time.time()
    run.evaluate({name: branches.merge()}, step, branches=branches)
    drift = branches.drift(run.model0)
    run.log(kind="drift", method=name, step=step, **drift)
    run.results.setdefault("_merge_probes", {}).setdefault(name, {}).setdefault("drift", []).append([step, drift])
    probe_time(run, name, started)


def probe_time(run: Run, name: str, started: float):
    """The probes' seconds, apart from the stage's own (results.json `_wall_s`, "probes:<name>")."""
    wall = run.results.setdefault("_wall_s", {})
    wall[f"probes:{name}"] = round(wall.get(f"probes:{name}", 0) + time.time() - started, 1)


def final_probes(run: Run, name: str, branches):
    """At the end of a CoPD stage: the branches written to OUT/<name>-branches/ (so later probes
    need no retraining); with every branch in this process, the output ensemble and the accuracy
    along (1−α)·θ^(a) + α·θ^(b) for each linked pair, on the final eval's problems (greedy)."""
    started = time.time()
    try:
        branches.save(os.path.join(run.settings.out, f"{name}-branches"))
    except (OSError, RuntimeError) as e:
        raise TrainingError(unwritable(run.settings.out, f"the {name} branches", e) + "; the last complete "
                            "checkpoint is kept: free space, then --resume") from None
    models = branches.all_branches()
    probes = run.results.setdefault("_merge_probes", {}).setdefault(name, {})
    if models is not None:
        heldout = {d: run.heldout[d][:run.preset.eval_size] for d in run.domains}
        sampling = run.preset.rl.sampling
        probes["ensemble"] = {d: round(ensemble_accuracy(list(models.values()), run.proc, ex, sampling), 4)
                              for d, ex in heldout.items()}
        run.log(kind="probe", method=name, probe="ensemble", accuracy=probes["ensemble"])
        measured = lambda model: {d: run.results[model][d] for d in run.domains}
        probes["interpolation"] = {}
        for a, b in [(a, b) for a in models for b in branches.teachers_of[a] if a < b]:
            known = {0.0: measured(f"{name}:{a}"), 1.0: measured(f"{name}:{b}")}
            if len(models) == 2:
                known[0.5] = measured(name)   # the merge of two branches is their midpoint
            curve = interpolation_curve(models[a], models[b], run.proc, heldout, sampling, known)
            for alpha, accs in curve:
                run.log(kind="probe", method=name, probe="interpolation", pair=f"{a}~{b}", alpha=alpha, accuracy=accs)
            probes["interpolation"][f"{a}~{b}"] = curve
    probe_time(run, name, started)


# the code of each stage config.METHODS lists
STAGES = {"base": base_stage, "experts": train_experts, "mixed": mixed_rlvr, "opd": static_opd, "mopd": mopd,
          "copd": copd, "copd@equal": lambda run, layout: copd(run, layout, "copd@equal", run.preset.steps)}


# -----------------------------------------------------------------------------
# the command line

def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)   # each kept line reaches a log file when printed
    rank = int(os.environ.get("RANK", "0"))
    try:
        args = parse_args(argv, __doc__)
    except UsageError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        code = run_command(args, rank)
        parallel.stop(code)
    except parallel.PeerError as e:
        parallel.give_up(e)
    except KeyboardInterrupt:
        if rank == 0:
            print(interrupted(args, sys.argv[1:] if argv is None else argv), file=sys.stderr)
        return 130
    return code


def interrupted(args, argv: list) -> str:
    """Ctrl-C: one line with the newest checkpoint and the command that continues from it."""
    found = list_checkpoints(args.out) if isinstance(args.out, str) else []
    again = [a for a in argv if a not in ("--overwrite", "--resume")]
    if not found:
        return f"interrupted before the first checkpoint; start again with: python train.py {shlex.join(again + ['--overwrite'])}"
    return f"interrupted; newest checkpoint {found[-1]}; continue with: python train.py {shlex.join(again + ['--resume'])}"


def run_command(args, rank: int) -> int:
    """Check, load π_0, run every stage of --method, write the results; the exit code."""
    layout = None
    try:
        settings = validate(args)
        if parallel.world_size() > 1:
            settings = parallel.check_ranks(settings)
        # data and model load before OUT exists: bad input leaves nothing behind
        for domain in settings.data:
            load_domain(domain, "train", 1, settings.seed, settings.preset.difficulty, settings.data)
        if parallel.world_size() > 1:
            try:
                layout = parallel.start(list(settings.experts), settings.dist_timeout)
            except ValueError as e:
                raise UsageError(str(e)) from None
        if layout and rank > 0:   # rank 0 builds (or loads) π_0 first; the others then load it
            parallel.barrier("the warm start")
        model0, proc = load_pi0(settings, settings.torch_dtype)
        if layout and rank == 0:
            parallel.barrier("the warm start")
        check_context(settings, model0, proc)
        # seeded after π_0 exists: building it reseeds torch, loading it from the cache does not
        torch.manual_seed(settings.seed)
        random.seed(settings.seed)
    except (UsageError, DataError, ModelError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    writer = rank == 0
    out = settings.out
    tmp_out = writer and not os.path.exists(out)
    if writer:
        os.makedirs(out, exist_ok=True)
        try:
            lock = hold_folder(out)   # noqa: F841 (held while this function runs: the whole run)
        except FolderInUse as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if settings.overwrite and not settings.resume:   # nothing of the earlier run may pass for this one's
            clear_run(out)
    try:
        run = Run(settings, model0, proc, writer)
        run.log(kind="config", settings=settings.as_dict(), recorded=settings.recorded())
        K, rl, opd = len(run.domains), settings.preset.rl, settings.preset.opd
        if writer:
            prompt_len = max(len(encode_prompt(proc, ex.prompt, ex.image, ex.video).ids)
                             for d in run.domains for ex in run.train_pool[d][:64])
            rows = max(rl.prompts_per_step * rl.group_size, opd.prompts_per_step * opd.samples_per_prompt)
            print(memory_plan(model0, settings.method, K, METHODS[settings.method].copies(K), rows,
                              prompt_len + rl.sampling.max_new_tokens, bool(layout)), flush=True)
        for name in METHODS[settings.method].stages:
            STAGES[name](run, layout)
        if writer:
            try:
                write_results(out, run.results, run.domains, run.curves, run.divergence,
                              title=f"--experts {','.join(run.domains)} --method {settings.method} "
                                    f"--preset {settings.preset_name} --seed {settings.seed}",
                              eval_size=len(run.heldout[run.domains[0]]),
                              budget=budgets(K, settings.preset.steps, settings.model),
                              learning_rate=describe_lr(settings.preset.lr, settings.preset.lr_schedule,
                                                        settings.preset.min_lr_frac))
            except OSError as e:   # each file is written whole or not at all
                raise TrainingError(unwritable(out, "the results", e) + "; the last complete checkpoint is kept: "
                                    "free space, then --resume") from None
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        if tmp_out:
            shutil.rmtree(out, ignore_errors=True)
        return 2
    except TrainingError as e:   # keep metrics.jsonl: it shows what went wrong
        print(f"error: {e}", file=sys.stderr)
        return 3
    if writer:
        print()
        print(results_table(run.results, run.domains))
        print(f"\nwrote {out}/results.json, results.md, curves.png, metrics.jsonl "
              f"({(time.time() - run.t0) / 60:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
