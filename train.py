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

Where this implementation departs from the paper, on purpose:
- Learning rate: AdamW at η = 2e-4 decaying along a cosine to 0.1·η over each loop (the paper:
  1e-6, constant). The tiny policy learns nothing at 1e-6, and at a constant η its greedy
  answers keep flipping; `--lr 1e-6 --lr-schedule constant` is the paper's setting.
- Scale: a 0.5M-parameter Qwen2.5-VL built from a config and warm-started on built-in tasks
  (the paper: Qwen3-VL-4B-Instruct on public benchmarks); 16 prompts x G = 8 per step on CPU
  (the paper: 256 x 8); OPD 8 prompts x 8 samples; T = 300 steps per expert.
- Loss aggregation: token-mean over the whole batch (the paper averages per sequence, then per
  group: `--loss-agg seq`); token-mean avoids the length bias, as TRL and verl default to.
- Unstated in the paper, so chosen here: β = 1 in Â_t = β·δ_t (`--opd-beta`; opd.OPDConfig
  says why); the static-OPD student is the finished expert, trained T steps; the MOPD student
  is π_0, trained K·T steps, as many as one CoPD branch; the CoPD schedule splits K·T steps into
  N cycles at S_RL : S_OPD = 1.5 : 1 (printed at start). `copd@equal` is CoPD at mixed RLVR's
  budget: T updates per branch, K·T in all.
- Each loop's η starts at the peak, the static-OPD student's too, although its expert ended at
  0.1·η: distillation is a new objective, and at 0.1·η the static student would take a tenth
  of the step that MOPD's and CoPD's students take, which would confound the comparison.
- The top-k reverse KL (`--opd-loss topk`) renormalises both distributions over the student's
  top k, as TRL does (a true KL, never negative).
"""

import os
import random
import shlex
import shutil
import sys
import time
from dataclasses import asdict

import torch

import parallel
from checkpoint import list_checkpoints
from config import UsageError, check_data, load_base, parse_args, settings, stages, start_ranks, validate
from copd import Branches, CoPDConfig, budget_schedule, describe, neighbours, schedule
from opd import divergence, opd_batch
from memory import clone_policy, memory_plan
from policy import encode_prompt
from report import budgets, describe_lr, results_table, write_results
from rlvr import grad_cosine, rlvr_step, update
from run import Run, TrainingError
from tasks import DataError, load_domain


# -----------------------------------------------------------------------------
# RLVR: one expert per domain, or mixed RLVR on their union (the paper's Eq. 7)

def train_rlvr(run: Run, name: str, model, domains: list, steps: int):
    """GRPO on the union of `domains` (one domain: an expert; all of them: mixed RLVR)."""
    opt = run.optimizer(model)
    start = run.begin_loop(name, {name: model}, {name: opt})
    if start == 0:
        run.evaluate({name: model}, 0)
    for step in run.progress(range(start + 1, steps + 1), initial=start, total=steps, desc=f"{name} (GRPO)"):
        examples = run.prompts(domains[0], run.p.rl.prompts_per_step) if len(domains) == 1 \
            else run.mixed_prompts(run.p.rl.prompts_per_step)
        lr = run.set_lr([opt], step, steps)
        stats = rlvr_step(model, opt, run.proc, examples, run.p.rl)
        run.log(kind="train", model=name, step=step, lr=lr, **stats)
        run.check_finite(name, step, stats)
        if step % run.p.eval_every == 0 or step == steps:
            run.evaluate({name: model}, step)
        run.end_of_step(name, step, {name: model}, {name: opt})
    return model


def train_experts(run: Run) -> dict:
    """One GRPO expert per domain, each a stage of its own (so a resumed run keeps them)."""
    T = run.p.steps
    for d in run.domains:
        name = f"expert:{d}"
        if run.todo(name):
            expert = train_rlvr(run, name, clone_policy(run.model0), [d], T)
            run.record(name, run.evaluate({name: expert}, T, final=True)[name], T)
            run.done(name, **{name: expert})
    experts = {d: run.models[f"expert:{d}"] for d in run.domains}
    if run.todo("experts"):
        for a, b in [(a, b) for a in run.domains for b in run.domains if a < b]:
            # the drift of independently trained experts, for contrast with CoPD's branches
            log_divergence(run, "experts", T, experts[a], experts[b], f"{a}~{b}", a)
        for d in run.domains:
            log_divergence(run, "experts", T, experts[d], run.model0, f"{d}~base", d)
        diag = {d: run.results[f"expert:{d}"][d] for d in run.domains}   # each expert on its own domain
        run.results["experts" if run.args.method != "rlvr" else "rlvr"] = {
            **diag, "average": round(sum(diag.values()) / len(diag), 4)}
        run.done("experts")
    return experts


# -----------------------------------------------------------------------------
# static OPD and MOPD: fixed teachers, no reward (the paper's Eq. 1/4)

def train_distill(run: Run, name: str, student, teachers: dict, domains: list, steps: int):
    """The student learns from fixed teachers {domain: model}, each on its own domain's prompts."""
    opt = run.optimizer(student)
    start = run.begin_loop(name, {name: student}, {name: opt})
    if start == 0:
        run.evaluate({name: student}, 0)
    n = run.p.opd.prompts_per_step
    for step in run.progress(range(start + 1, steps + 1), initial=start, total=steps, desc=f"{name} (OPD)"):
        examples = run.prompts(domains[0], n) if len(domains) == 1 else run.mixed_prompts(n)
        lr = run.set_lr([opt], step, steps)
        batch, stats = opd_batch(student, teachers, run.proc, examples, run.p.rl, run.p.opd)
        stats.update(update(student, opt, run.proc, [batch], run.p.rl))
        run.log(kind="train", model=name, step=step, lr=lr, **stats)
        run.check_finite(name, step, stats)
        if step % run.p.eval_every == 0 or step == steps:
            run.evaluate({name: student}, step)
        run.end_of_step(name, step, {name: student}, {name: opt})
    return student


def log_divergence(run: Run, method: str, step: int, student, teacher, pair: str, domain: str):
    """Top-k overlap (Eq. 6) and symmetric KL of two policies on the student's own rollouts."""
    examples = run.heldout[domain][:run.p.divergence_prompts]
    div = divergence(student, teacher, run.proc, examples, run.p.rl, run.p.opd.overlap_k)
    run.log(kind="divergence", method=method, pair=pair, step=step, **div)
    run.divergence.setdefault(method, {}).setdefault(pair, []).append((step, div))


# -----------------------------------------------------------------------------
# CoPD (the paper's Algorithm 1)

def train_copd(run: Run, layout=None, name: str = "copd", updates: int | None = None):
    """K branches from π_0; N cycles of Phase I (GRPO on each branch's own domain) and Phase II
    (GRPO + OPD from the neighbouring branches, in one update); `updates` per branch: K·T, the
    paper's, or T for "copd@equal" (the K branches together take mixed RLVR's K·T).
    All branches in this process, or under torchrun (`layout`) this rank's branch: the loop is
    the same, the team (copd.Branches or parallel.RankBranches) does the rest."""
    K, T = len(run.domains), run.p.steps
    updates = updates or K * T
    cycles = max(1, min(run.p.cycles, updates // 2))   # a cycle holds at least one step of each phase
    rl_steps, opd_steps = budget_schedule(updates, cycles)
    cfg = CoPDConfig(cycles=cycles, rl_steps=rl_steps, opd_steps=opd_steps, topology=run.args.topology)
    if run.writer:
        print(describe(cfg, run.domains))
    links = neighbours(run.domains, cfg.topology, cfg.hub)
    team = (parallel.RankBranches(layout, run.model0, links, run.optimizer, name) if layout
            else Branches(run.model0, run.domains, links, run.optimizer, name))
    models, optimizers = team.named()
    steps = schedule(cfg)
    start = run.begin_loop(name, models, optimizers)
    if start == 0:
        run.evaluate(models, 0, team=team)
    for i, (cycle, phase, in_phase) in enumerate(run.progress(steps, desc=name), 1):
        if i <= start:
            continue
        lr = run.set_lr(optimizers.values(), i, len(steps))
        stats = team.step(run.proc, run.train, phase, run.p.rl, run.p.opd, step_seed=f"{run.args.seed}:{name}:{i}")
        for d, s in stats.items():
            run.log(kind="train", model=f"{name}:{d}", step=i, cycle=cycle, phase=phase, lr=lr, **s)
            run.check_finite(f"{name}:{d}", i, s)
        if i % run.p.divergence_every == 0 or i == len(steps):
            for pair, student, teacher, domain in team.probes(run.model0):
                log_divergence(run, name, i, student, teacher, pair, domain)
        if i % run.p.eval_every == 0:
            run.evaluate(models, i, team=team)
        run.end_of_step(name, i, models, optimizers, where=f"{name} cycle {cycle} {phase} step {in_phase + 1} (update {i})")
    return team


# -----------------------------------------------------------------------------
# the methods in order, and the command line

def run_methods(run: Run, layout=None):
    """Every stage of --method in order; each finished stage is skipped when resuming."""
    K, T = len(run.domains), run.p.steps
    wanted = stages(run.args.method)
    if run.todo("base"):
        run.record("base", run.evaluate({"base": run.model0}, 0, final=True)["base"])
        if K >= 2 and run.args.method in ("all", "mixed"):
            prompts = {d: run.prompts(d, run.p.rl.prompts_per_step) for d in run.domains}
            run.results["_grad_cosine"] = grad_cosine(clone_policy(run.model0), run.proc, prompts, run.p.rl)
        run.done("base")
    if {"experts", "opd", "mopd"} & set(wanted):
        experts = train_experts(run)
    if "mixed" in wanted and run.todo("mixed"):
        mixed = train_rlvr(run, "mixed", clone_policy(run.model0), run.domains, K * T)
        run.record("mixed", run.evaluate({"mixed": mixed}, K * T, final=True)["mixed"], K * T)
        run.done("mixed")
    if "opd" in wanted:
        directions = [(a, b) for b in run.domains for a in neighbours(run.domains)[b]]
        for a, b in directions:  # a teaches b, on a's domain
            name = f"opd:{a}->{b}"
            if run.todo(name):
                student = train_distill(run, name, clone_policy(experts[b]), {a: experts[a]}, [a], T)
                run.record(name, run.evaluate({name: student}, T, final=True)[name], T)
                run.done(name)
        # the summary row: the mean over directions (the paper reports each; so do we)
        rows = [run.results[f"opd:{a}->{b}"] for a, b in directions]
        run.results["opd"] = {d: round(sum(r[d] for r in rows) / len(rows), 4) for d in run.domains}
        run.results["opd"]["average"] = round(sum(run.results["opd"].values()) / K, 4)
    if "mopd" in wanted and run.todo("mopd"):
        # as many updates as one CoPD branch (K·T): the student has K domains to learn, as a branch does
        student = train_distill(run, "mopd", clone_policy(run.model0), experts, run.domains, K * T)
        run.record("mopd", run.evaluate({"mopd": student}, K * T, final=True)["mopd"], K * T)
        run.done("mopd")
    for method, updates in (("copd", K * T), ("copd@equal", T)):
        if method in wanted and run.todo(method):
            team = train_copd(run, layout, method, updates)
            merged = team.merge()
            for name, accs in run.evaluate(team.named()[0], updates, final=True, team=team).items():
                run.record(name, accs, updates)
            run.record(method, run.evaluate({method: merged}, updates, final=True, team=team)[method], updates)
            run.done(method)


def main(argv=None):
    args = parse_args(argv, __doc__)
    rank = int(os.environ.get("RANK", "0"))
    try:
        code = _main(args, rank)
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


def _main(args, rank: int):
    layout = None
    try:
        preset = validate(args)
        # data and model load before OUT exists: bad input leaves nothing behind
        for domain in args.data:
            load_domain(domain, "train", 1, args.seed, preset.difficulty, args.data)
        if parallel.world_size() > 1:
            layout = start_ranks(args, preset)
        if layout and rank > 0:   # rank 0 builds (or loads) π_0 first; the others then load it
            parallel.barrier("the warm start")
        model0, proc = load_base(args, preset)
        if layout and rank == 0:
            parallel.barrier("the warm start")
        check_data(args, preset, model0, proc)
        # seeded after π_0 exists: building it reseeds torch, loading it from the cache does not
        torch.manual_seed(args.seed)
        random.seed(args.seed)
    except (UsageError, DataError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    writer = rank == 0
    tmp_out = writer and not os.path.exists(args.out)
    if writer:
        os.makedirs(args.out, exist_ok=True)
        if args.overwrite and not args.resume:   # the earlier run's checkpoints must not be resumed later
            for old in list_checkpoints(args.out):
                os.remove(old)
    try:
        run = Run(args, preset, model0, proc, writer, settings(args, preset))
        run.log(kind="config", args=vars(args), preset=asdict(preset))
        K, rl, opd = len(run.domains), preset.rl, preset.opd
        if writer:
            prompt_len = max(len(encode_prompt(proc, ex.prompt, ex.image, ex.video).ids)
                             for d in run.domains for ex in run.train[d][:64])
            rows = max(rl.prompts_per_step * rl.group_size, opd.prompts_per_step * opd.samples_per_prompt)
            print(memory_plan(model0, args.method, K, rows, prompt_len + rl.sampling.max_new_tokens, bool(layout)))
        run_methods(run, layout)
        if writer:
            write_results(args.out, run.results, run.domains, run.curves, run.divergence,
                          title=f"--experts {','.join(run.domains)} --method {args.method} "
                                f"--preset {args.preset} --seed {args.seed}",
                          eval_size=len(run.heldout[run.domains[0]]), budget=budgets(K, preset.steps, args.model),
                          learning_rate=describe_lr(preset.lr, preset.lr_schedule, preset.min_lr_frac))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        if tmp_out:
            shutil.rmtree(args.out, ignore_errors=True)
        return 2
    except TrainingError as e:   # keep metrics.jsonl: it shows what went wrong
        print(f"error: {e}", file=sys.stderr)
        return 3
    if writer:
        print()
        print(results_table(run.results, run.domains))
        print(f"\nwrote {args.out}/results.json, results.md, curves.png, metrics.jsonl "
              f"({(time.time() - run.t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
