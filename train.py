"""
Train and compare: CoPD against RLVR experts, mixed RLVR, static OPD and multi-teacher OPD,
from one base policy π_0, with equal step budgets (DESIGN.md §4).

    python train.py --experts text,image                       # CoPD (the default method)
    python train.py --experts text --method rlvr --preset cpu  # one GRPO expert
    python train.py --experts text,image --method all          # every method, then the table

Writes OUT/metrics.jsonl (one JSON object per step and eval), OUT/results.json (method ->
domain -> held-out greedy accuracy, with "average"), OUT/results.md (the table, budgets and
seed) and OUT/curves.png.
"""

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch

if int(os.environ.get("RANK", "0")) > 0:   # under torchrun only rank 0 draws progress bars
    os.environ["TQDM_DISABLE"] = "1"
from tqdm import tqdm  # noqa: E402 (after the line above)

from checkpoint import list_checkpoints, load_latest, rng_state, save_checkpoint, set_rng_state
from copd import CoPDConfig, branch_seed, budget_schedule, copd_step, describe, merge_average, neighbours, schedule
from opd import OPDConfig, divergence, opd_batch
import parallel
from policy import TinyConfig, clone_policy, encode_prompt, load_policy, prepare_for_training
from report import memory_plan, results_table, write_results
from rlvr import RLConfig, backward_tokens, grpo_batch, loss_weights, rlvr_step, score, update
from rollout import SamplingConfig, generate
from tasks import DOMAINS, DataError, load_domain
from warmstart import WarmStartConfig, warm_start

METHODS = ("base", "rlvr", "experts", "mixed", "opd", "mopd", "copd", "all")


# -----------------------------------------------------------------------------
# configuration: presets are dataclasses with defaults that run

@dataclass
class Preset:
    steps: int = 60                    # T: GRPO steps of one expert; mixed and CoPD get K·T
    max_total_steps: int = 0           # if set, T = min(steps, this // K): K·T stays within it as experts are added
    cycles: int = 4                    # N of CoPD
    difficulty: int = 2
    train_pool: int = 4000             # training prompts per domain
    eval_size: int = 400               # held-out prompts per domain, final eval
    curve_eval_size: int = 100         # held-out prompts per domain, evals during training
    eval_every: int = 20
    eval_samples: int = 2              # sampled responses per prompt for the mean-over-samples accuracy
    divergence_every: int = 20
    divergence_prompts: int = 16
    lr: float = 2e-4                   # η, the peak learning rate of every loop
    lr_schedule: str = "cosine"        # "cosine" (η down to min_lr_frac·η at a loop's last update) | "constant"
    min_lr_frac: float = 0.1
    tiny: TinyConfig = field(default_factory=TinyConfig)
    warm: WarmStartConfig = field(default_factory=WarmStartConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    opd: OPDConfig = field(default_factory=OPDConfig)


def presets():
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=10)
    smoke = Preset(steps=4, cycles=2, train_pool=200, eval_size=16, curve_eval_size=8, eval_every=2,
                   eval_samples=1, divergence_every=2, divergence_prompts=4,
                   warm=WarmStartConfig(steps=20, batch_size=16, train_examples=200),
                   rl=RLConfig(prompts_per_step=4, group_size=4, sampling=sampling),
                   opd=OPDConfig(prompts_per_step=4, samples_per_prompt=2, metric_rows=8))
    cpu = Preset(steps=300, max_total_steps=600, cycles=4, lr=2e-4,
                 eval_every=50, eval_size=500, curve_eval_size=200,
                 rl=RLConfig(prompts_per_step=16, group_size=8, sampling=sampling),
                 opd=OPDConfig(prompts_per_step=16, samples_per_prompt=4))
    gpu = Preset(steps=200, cycles=8, eval_size=1000, curve_eval_size=200,
                 tiny=TinyConfig(hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=4, intermediate_size=768),
                 warm=WarmStartConfig(steps=1500, batch_size=128),
                 rl=RLConfig(prompts_per_step=64, group_size=8, micro_batch=512, sampling=sampling),
                 opd=OPDConfig(prompts_per_step=64, samples_per_prompt=4))
    return {"smoke": smoke, "cpu": cpu, "gpu": gpu}


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""


class TrainingError(Exception):
    """Training cannot go on (e.g. non-finite losses): printed as one line, exit code 3."""


MAX_SKIPPED_IN_A_ROW = 5


# -----------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(model, proc, examples: list, sampling: SamplingConfig, samples: int = 1, batch: int = 256):
    """Held-out accuracy: greedy, and the mean over `samples` sampled responses."""
    greedy, sampled = [], []
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        prompts = [encode_prompt(proc, ex.prompt, ex.image, ex.video) for ex in chunk]
        greedy.append(score(generate(model, proc, prompts, 1, sampling, greedy=True).texts, chunk, 1)[1])
        if samples:
            sampled.append(score(generate(model, proc, prompts, samples, sampling).texts, chunk, samples)[1])
    out = {"greedy": float(torch.cat(greedy).mean())}
    if samples:
        out["sampled"] = float(torch.cat(sampled).mean())
    return out


class Run:
    """Everything one invocation shares: π_0, data, the log, and the results so far."""

    def __init__(self, args, preset: Preset, model0, proc, layout=None):
        self.args, self.p, self.model0, self.proc = args, preset, model0, proc
        # under torchrun every rank keeps the same results; rank 0 alone writes them
        self.layout, self.writer = layout, layout is None or layout.rank == 0
        self.domains = args.experts
        self.rng = random.Random(args.seed)
        self.train = {d: load_domain(d, "train", preset.train_pool, args.seed, preset.difficulty, args.data)
                      for d in self.domains}
        self.heldout = {d: load_domain(d, "heldout", preset.eval_size, args.seed, preset.difficulty, args.data)
                        for d in self.domains}
        self.results, self.curves, self.divergence = {}, {}, {}
        self.skipped_in_a_row = {}
        self.completed, self.models = [], {}     # finished stages; finished models later stages need
        self.resume, self.lines = None, 0
        metrics = os.path.join(args.out, "metrics.jsonl")
        if args.resume:
            path, snap = load_latest(args.out)
            if snap is None:
                print(f"no checkpoint in {args.out}: starting from the beginning")
            else:
                print(f"resuming from {path}, {snap['where']}")
                self.resume = snap
                self.completed, self.results = snap["completed"], snap["results"]
                self.curves, self.divergence = snap["curves"], snap["divergence"]
                self.skipped_in_a_row = snap["skipped"]
                for name, state in snap["models"].items():
                    self.models[name] = clone_policy(model0)
                    self.models[name].load_state_dict(state)
                self.lines = snap["metrics_lines"]
                with open(metrics) as f:   # drop what was logged after the checkpoint
                    kept = f.readlines()[:self.lines]
                with open(metrics, "w") as f:
                    f.writelines(kept)
        self.log_file = open(metrics if self.writer else os.devnull, "a" if self.resume else "w")
        self.t0 = time.time()

    # -- stages, checkpoints and resuming

    def todo(self, stage: str) -> bool:
        return stage not in self.completed

    def done(self, stage: str, **keep):
        """Mark a stage finished, keeping the models that later stages need."""
        self.models.update(keep)
        self.completed.append(stage)

    def begin_loop(self, loop: str, models: dict, optimizers: dict) -> int:
        """The step a training loop starts after: 0, or where the checkpoint being resumed left
        it (its weights, optimizer state and RNG states are loaded here)."""
        snap = self.resume
        if snap is None or snap["loop"] != loop:
            return 0
        for name, model in models.items():
            model.load_state_dict(snap["loop_models"][name])
        for name, opt in optimizers.items():
            opt.load_state_dict(snap["loop_optimizers"][name])
        set_rng_state(self.rng, snap["rng"])
        self.resume = None
        return snap["step"]

    def end_of_step(self, loop: str, step: int, models: dict, optimizers: dict, where: str = ""):
        """Checkpoint every --ckpt-every steps of any loop."""
        every = self.args.ckpt_every
        if not every or step % every:
            return
        save_checkpoint(self.args.out, {
            "loop": loop, "step": step, "where": where or f"{loop} step {step}",
            "completed": list(self.completed), "models": {k: m.state_dict() for k, m in self.models.items()},
            "loop_models": {k: m.state_dict() for k, m in models.items()},
            "loop_optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "rng": rng_state(self.rng), "results": self.results, "curves": self.curves,
            "divergence": self.divergence, "skipped": self.skipped_in_a_row, "metrics_lines": self.lines})

    def prompts(self, domain: str, n: int):
        return [self.rng.choice(self.train[domain]) for _ in range(n)]

    def mixed_prompts(self, n: int):
        """An equal share of each domain (the union D_1 ∪ … ∪ D_K)."""
        per = [n // len(self.domains) + (i < n % len(self.domains)) for i in range(len(self.domains))]
        return [ex for d, k in zip(self.domains, per) for ex in self.prompts(d, k)]

    def log(self, **row):
        row["time"] = round(time.time() - self.t0, 2)
        self.log_file.write(json.dumps(row) + "\n")
        self.log_file.flush()
        self.lines += 1
        if row.get("kind") == "train":   # a skipped step had a non-finite loss or gradient
            model = row["model"]
            self.skipped_in_a_row[model] = self.skipped_in_a_row.get(model, 0) + 1 if row.get("skipped") else 0
            if self.skipped_in_a_row[model] >= MAX_SKIPPED_IN_A_ROW:
                raise TrainingError(f"{model}: {MAX_SKIPPED_IN_A_ROW} steps in a row had a non-finite "
                                    f"loss or gradient (last at step {row.get('step')}); stopping")

    def eval(self, name: str, model, step: int, final: bool = False):
        """Accuracy of `model` on every domain; logged, and kept for the curves."""
        return self.note_eval(name, step, final, self.measure(name, model, step, final))

    def measure(self, name: str, model, step: int, final: bool = False):
        size = self.p.eval_size if final else self.p.curve_eval_size
        # its own seed: the same samples whichever process evaluates (parallel.py)
        torch.manual_seed(branch_seed(f"{self.args.seed}:eval:{step}:{final}", name))
        return {d: evaluate(model, self.proc, self.heldout[d][:size], self.p.rl.sampling,
                            self.p.eval_samples if final else 0) for d in self.domains}

    def note_eval(self, name: str, step: int, final: bool, accs: dict):
        self.log(kind="eval", model=name, step=step, final=final, accuracy=accs)
        if not final:   # the final eval uses a larger set: it would put a jump at the curve's end
            self.curves.setdefault(name, []).append((step, {d: a["greedy"] for d, a in accs.items()}))
        return accs

    def record(self, method: str, accs: dict):
        row = {d: round(a["greedy"], 4) for d, a in accs.items()}
        row["average"] = round(sum(row.values()) / len(row), 4)
        self.results[method] = row
        if any("sampled" in a for a in accs.values()):
            self.results.setdefault("_sampled", {})[method] = {d: round(a["sampled"], 4) for d, a in accs.items()}

    def optimizer(self, model):
        trainable = [p for p in model.parameters() if p.requires_grad]   # with LoRA: the adapters
        return torch.optim.AdamW(trainable, lr=self.p.lr, betas=(0.9, 0.99), weight_decay=0.0)

    def set_lr(self, opts: list, step: int, total: int) -> float:
        """Every loop (an expert, mixed, OPD, MOPD, CoPD's branches) decays on its own `total`
        updates. A function of the step, not a scheduler's state, so a resumed run agrees."""
        lr = learning_rate(self.p.lr, step, total, self.p.lr_schedule, self.p.min_lr_frac)
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = lr
        return lr


def learning_rate(peak: float, step: int, total: int, schedule: str = "cosine", min_frac: float = 0.1) -> float:
    """η_t of update t = 1..total. cosine: η·(f + (1 − f)·½(1 + cos(π(t − 1)/(total − 1)))),
    η at the first update and f·η at the last; constant: η.
    Why decay: at a constant η the tiny policy's greedy answers keep flipping (held-out text
    accuracy swung ±8 points between evals 50 steps apart), and the last weights are the ones
    reported."""
    if schedule == "constant" or total <= 1:
        return peak
    progress = (step - 1) / (total - 1)
    return peak * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


# -----------------------------------------------------------------------------
# the methods

def train_rlvr(run: Run, name: str, model, domains: list, steps: int):
    """GRPO on the union of `domains` (one domain: an expert; all of them: mixed RLVR)."""
    opt = run.optimizer(model)
    start = run.begin_loop(name, {name: model}, {name: opt})
    if start == 0:
        run.eval(name, model, 0)
    for step in tqdm(range(start + 1, steps + 1), initial=start, total=steps, desc=f"{name} (GRPO)", leave=False):
        examples = run.prompts(domains[0], run.p.rl.prompts_per_step) if len(domains) == 1 \
            else run.mixed_prompts(run.p.rl.prompts_per_step)
        lr = run.set_lr([opt], step, steps)
        stats = rlvr_step(model, opt, run.proc, examples, run.p.rl)
        run.log(kind="train", model=name, step=step, lr=lr, **stats)
        if step % run.p.eval_every == 0 or step == steps:
            run.eval(name, model, step)
        run.end_of_step(name, step, {name: model}, {name: opt})
    return model


def train_experts(run: Run):
    """One GRPO expert per domain, each a stage of its own (so a resumed run keeps them)."""
    for d in run.domains:
        name = f"expert:{d}"
        if run.todo(name):
            expert = train_rlvr(run, name, clone_policy(run.model0), [d], run.p.steps)
            run.record(name, run.eval(name, expert, run.p.steps, final=True))
            run.done(name, **{name: expert})
    experts = {d: run.models[f"expert:{d}"] for d in run.domains}
    if run.todo("experts"):
        pairs = [(a, b) for a in run.domains for b in run.domains if a < b]
        for a, b in pairs:  # the drift of independently trained experts, for contrast with CoPD
            log_divergence(run, "experts", run.p.steps, experts[a], experts[b], f"{a}~{b}", a)
        for d in run.domains:
            log_divergence(run, "experts", run.p.steps, experts[d], run.model0, f"{d}~base", d)
        diag = {d: run.results[f"expert:{d}"][d] for d in run.domains}   # each expert on its own domain
        run.results["experts" if run.args.method != "rlvr" else "rlvr"] = {
            **diag, "average": round(sum(diag.values()) / len(diag), 4)}
        run.done("experts")
    return experts


def train_distill(run: Run, name: str, student, teachers: dict, domains: list, steps: int):
    """Static OPD: the student learns from fixed teachers on their domains, no reward."""
    opt = run.optimizer(student)
    start = run.begin_loop(name, {name: student}, {name: opt})
    if start == 0:
        run.eval(name, student, 0)
    n = run.p.opd.prompts_per_step
    for step in tqdm(range(start + 1, steps + 1), initial=start, total=steps, desc=f"{name} (OPD)", leave=False):
        examples = run.prompts(domains[0], n) if len(domains) == 1 else run.mixed_prompts(n)
        lr = run.set_lr([opt], step, steps)
        batch, stats = opd_batch(student, teachers, run.proc, examples, run.p.rl, run.p.opd)
        stats.update(update(student, opt, run.proc, [batch], run.p.rl))
        run.log(kind="train", model=name, step=step, lr=lr, **stats)
        if step % run.p.eval_every == 0 or step == steps:
            run.eval(name, student, step)
        run.end_of_step(name, step, {name: student}, {name: opt})
    return student


def log_divergence(run: Run, method: str, step: int, student, teacher, pair: str, domain: str):
    examples = run.heldout[domain][:run.p.divergence_prompts]
    div = divergence(student, teacher, run.proc, examples, run.p.rl, run.p.opd.overlap_k)
    run.log(kind="divergence", method=method, pair=pair, step=step, **div)
    run.divergence.setdefault(method, {}).setdefault(pair, []).append((step, div))


def eval_spread(run: Run, models: dict, step: int, final: bool = False) -> dict:
    """run.eval of each {name: model}. Under torchrun each rank passes the models it owns (a
    branch's first replica its branch); every rank learns every result, rank 0 logs them."""
    if run.layout is None:
        return {name: run.eval(name, m, step, final) for name, m in models.items()}
    mine = {name: run.measure(name, m, step, final) for name, m in models.items()}
    everyone = {name: accs for part in parallel.gather(mine, "an evaluation") for name, accs in part.items()}
    return {name: run.note_eval(name, step, final, accs) for name, accs in everyone.items()}


def train_copd(run: Run):
    """CoPD's branches, all in this process, or under torchrun this rank's branch only
    (parallel.py); either way each branch trains the same."""
    K, T = len(run.domains), run.p.steps
    rl_steps, opd_steps = budget_schedule(K * T, run.p.cycles)
    cfg = CoPDConfig(cycles=run.p.cycles, rl_steps=rl_steps, opd_steps=opd_steps,
                     topology=run.args.topology)
    if run.writer:
        print(describe(cfg, run.domains))
    links = neighbours(run.domains, cfg.topology, cfg.hub)
    layout = run.layout
    mine = run.domains if layout is None else [layout.branch]
    branches = {d: clone_policy(run.model0) for d in mine}
    opts = {d: run.optimizer(m) for d, m in branches.items()}
    named = ({f"copd:{d}": m for d, m in branches.items()}, {f"copd:{d}": o for d, o in opts.items()})
    # the models this rank evaluates: under torchrun, a branch's first replica
    evaluated = named[0] if layout is None or layout.replica == 0 else {}
    steps = schedule(cfg)
    start = run.begin_loop("copd", *named)
    if start == 0:
        eval_spread(run, evaluated, 0)
    for i, (cycle, phase, in_phase) in enumerate(tqdm(steps, desc="CoPD", leave=False), 1):
        if i <= start:
            continue
        step_seed = f"{run.args.seed}:copd:{i}"
        lr = run.set_lr(list(opts.values()), i, len(steps))
        if layout is None:
            stats = copd_step(branches, opts, run.proc, run.train, phase, links, run.p.rl, run.p.opd, step_seed)
        else:
            (d,) = mine
            own = parallel.copd_step(layout, branches[d], opts[d], run.proc, run.train, phase, links,
                                     run.p.rl, run.p.opd, step_seed)
            stats = {b: s for b, r, s in parallel.gather((d, layout.replica, own), "the step's statistics") if r == 0}
        for d, s in stats.items():
            run.log(kind="train", model=f"copd:{d}", step=i, cycle=cycle, phase=phase, lr=lr, **s)
        # the divergence probes need two branches in one process; across ranks the OPD
        # batches' own overlap (overlap_from_*) is the measure
        if layout is None and (i % run.p.divergence_every == 0 or i == len(steps)):
            for a in run.domains:
                for b in links[a]:
                    if a < b:
                        log_divergence(run, "copd", i, branches[a], branches[b], f"{a}~{b}", a)
                log_divergence(run, "copd", i, branches[a], run.model0, f"{a}~base", a)
        if i % run.p.eval_every == 0:
            eval_spread(run, evaluated, i)
        run.end_of_step("copd", i, *named, where=f"CoPD cycle {cycle} {phase} step {in_phase + 1} (update {i})")
    if layout is None:
        merged = merge_average(list(branches.values()))
    else:
        merged = parallel.merge_average(layout, branches[mine[0]])
    return merged, {d: m for d, m in branches.items() if f"copd:{d}" in evaluated}


def grad_cosine(run: Run, model) -> dict:
    """cos(∇L_a, ∇L_b) of two domains' GRPO losses on the same weights (gradient conflict)."""
    grads = {}
    for d in run.domains:
        batch, _ = grpo_batch(model, run.proc, run.prompts(d, run.p.rl.prompts_per_step), run.p.rl)
        model.zero_grad(set_to_none=True)
        w = loss_weights([batch.rollout.mask], run.p.rl.loss_agg)[0]
        backward_tokens(model, run.proc, batch.rollout, w, run.p.rl, batch.token_loss)
        grads[d] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                              for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    return {f"{a}~{b}": round(float(torch.nn.functional.cosine_similarity(grads[a], grads[b], dim=0)), 4)
            for a in run.domains for b in run.domains if a < b}


# -----------------------------------------------------------------------------
# main

def run_methods(run: Run):
    """Every wanted method in order; each finished stage is skipped when resuming."""
    method, K, T = run.args.method, len(run.domains), run.p.steps
    wanted = {"all": ["base", "experts", "mixed", "opd", "mopd", "copd"], "rlvr": ["base", "experts"]}.get(
        method, ["base", method])
    if run.todo("base"):
        run.record("base", run.eval("base", run.model0, 0, final=True))
        if K >= 2 and method in ("all", "mixed"):
            run.results["_grad_cosine"] = grad_cosine(run, clone_policy(run.model0))
        run.done("base")
    if any(m in wanted for m in ("experts", "opd", "mopd")):
        experts = train_experts(run)
    if "mixed" in wanted and run.todo("mixed"):
        mixed = train_rlvr(run, "mixed", clone_policy(run.model0), run.domains, K * T)
        run.record("mixed", run.eval("mixed", mixed, K * T, final=True))
        run.done("mixed")
    if "opd" in wanted:
        directions = [(a, b) for b in run.domains for a in neighbours(run.domains)[b]]
        for a, b in directions:  # a teaches b, on a's domain
            name = f"opd:{a}->{b}"
            if run.todo(name):
                student = train_distill(run, name, clone_policy(experts[b]), {a: experts[a]}, [a], T)
                run.record(name, run.eval(name, student, T, final=True))
                run.done(name)
        # the summary row: the mean over directions (the paper reports each; so do we)
        rows = [run.results[f"opd:{a}->{b}"] for a, b in directions]
        run.results["opd"] = {d: round(sum(r[d] for r in rows) / len(rows), 4) for d in run.domains}
        run.results["opd"]["average"] = round(sum(run.results["opd"].values()) / K, 4)
    if "mopd" in wanted and run.todo("mopd"):
        student = train_distill(run, "mopd", clone_policy(run.model0), experts, run.domains, T)
        run.record("mopd", run.eval("mopd", student, T, final=True))
        run.done("mopd")
    if "copd" in wanted and run.todo("copd"):
        merged, branches = train_copd(run)
        for name, accs in eval_spread(run, {f"copd:{d}": m for d, m in branches.items()}, K * T, True).items():
            run.record(name, accs)
        merged_here = {"copd": merged} if run.writer else {}   # under torchrun: rank 0
        run.record("copd", eval_spread(run, merged_here, K * T, True)["copd"])
        run.done("copd")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", default="text,image", help="comma-separated domains: text,image,video")
    ap.add_argument("--method", default="copd", help="|".join(METHODS))
    ap.add_argument("--preset", default="cpu", help="smoke | cpu | gpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default runs/<method>-<experts>-s<seed>)")
    ap.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    ap.add_argument("--ckpt-every", type=int, default=50, help="checkpoint every N steps of any loop (0: never)")
    ap.add_argument("--model", default=None, help="a checkpoint (hub name or folder) instead of the tiny π_0")
    ap.add_argument("--data", action="append", default=[], metavar="DOMAIN=PATH", help="JSONL prompts of a domain")
    ap.add_argument("--steps", type=int, default=None, help="T, GRPO steps per expert (overrides the preset)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate η (overrides the preset)")
    ap.add_argument("--lr-schedule", default=None, help="cosine | constant")
    ap.add_argument("--opd-loss", default=None, help="sampled | full | topk")
    ap.add_argument("--loss-agg", default=None, help="token | seq | seq_len_max")
    ap.add_argument("--advantage", default=None, help="grpo | dr_grpo")
    ap.add_argument("--topology", default="hub", help="hub | all-pairs (three or more experts)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="response length cap (overrides the preset)")
    ap.add_argument("--micro-batch", type=int, default=None, help="rows per forward/backward (overrides the preset)")
    ap.add_argument("--dtype", default="fp32", help="fp32 | bf16: the weights' dtype (bf16 halves them)")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing: recompute activations in backward")
    ap.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (needs peft); 0: all weights")
    ap.add_argument("--dist-timeout", type=float, default=900,
                    help="under torchrun: seconds a rank waits for the others before giving up")
    args = ap.parse_args(argv)
    return args


def validate(args):
    """Every check that can fail before anything is written."""
    args.experts = [d.strip() for d in args.experts.split(",") if d.strip()]
    for d in args.experts:
        if d not in DOMAINS:
            raise UsageError(f"unknown domain '{d}' in --experts (choose from {', '.join(DOMAINS)})")
    if len(set(args.experts)) != len(args.experts):
        raise UsageError("--experts lists a domain twice")
    if args.method not in METHODS:
        raise UsageError(f"unknown method '{args.method}' (choose from {', '.join(METHODS)})")
    if args.method in ("mixed", "opd", "mopd", "copd", "all") and len(args.experts) < 2:
        raise UsageError(f"--method {args.method} needs at least two experts, e.g. --experts text,image")
    if args.preset not in presets():
        raise UsageError(f"unknown preset '{args.preset}' (choose from {', '.join(presets())})")
    if args.dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{args.dtype}' (choose from {', '.join(DTYPES)})")
    if args.lora_rank < 0:
        raise UsageError("--lora-rank must be 0 (train every weight) or a positive rank")
    if args.topology not in ("hub", "all-pairs"):
        raise UsageError(f"unknown topology '{args.topology}' (hub or all-pairs)")
    data = {}
    for item in args.data:
        domain, sep, path = item.partition("=")
        if not sep or domain not in DOMAINS:
            raise UsageError(f"--data expects DOMAIN=PATH with DOMAIN in {', '.join(DOMAINS)}, got '{item}'")
        data[domain] = path
    args.data = data
    if args.model and os.path.sep in args.model and not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model}: no such folder")
    args.out = args.out or os.path.join("runs", f"{args.method}-{'-'.join(args.experts)}-s{args.seed}")
    earlier = os.path.exists(os.path.join(args.out, "results.json")) or list_checkpoints(args.out)
    if earlier and not (args.overwrite or args.resume):
        raise UsageError(f"{args.out} already holds a run: pass --resume, --overwrite or another --out")
    if args.overwrite and not args.resume:
        for old in list_checkpoints(args.out):
            os.remove(old)
    preset = presets()[args.preset]
    if args.steps:
        preset.steps = args.steps
    elif preset.max_total_steps:
        preset.steps = min(preset.steps, preset.max_total_steps // len(args.experts))
    for flag, name in ((args.max_new_tokens, "--max-new-tokens"), (args.micro_batch, "--micro-batch")):
        if flag is not None and flag < 1:
            raise UsageError(f"{name} must be at least 1")
    if args.lr is not None:
        if not (math.isfinite(args.lr) and args.lr > 0):
            raise UsageError(f"--lr must be a positive number, got {args.lr}")
        preset.lr = args.lr
    if args.max_new_tokens:
        preset.rl.sampling = replace(preset.rl.sampling, max_new_tokens=args.max_new_tokens)
    if args.micro_batch:
        preset.rl.micro_batch = args.micro_batch
    for flag, target, name, choices in ((args.opd_loss, preset.opd, "loss", ("sampled", "full", "topk")),
                                        (args.loss_agg, preset.rl, "loss_agg", ("token", "seq", "seq_len_max")),
                                        (args.advantage, preset.rl, "advantage", ("grpo", "dr_grpo")),
                                        (args.lr_schedule, preset, "lr_schedule", ("cosine", "constant"))):
        if flag is not None:
            if flag not in choices:
                raise UsageError(f"unknown value '{flag}' (choose from {', '.join(choices)})")
            setattr(target, name, flag)
    return preset


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_base(args, preset: Preset):
    """π_0 and its processor: --model, or the warm-started tiny policy; then the memory options."""
    if args.model:
        try:
            model, proc = load_policy(args.model, dtype=DTYPES[args.dtype], device=args.device)
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"--model {args.model}: cannot load it ({str(e).splitlines()[0]})") from None
    else:
        model, proc = warm_start(preset.tiny, replace(preset.warm, difficulty=preset.difficulty), args.seed,
                                 device=args.device)
        model = model.to(DTYPES[args.dtype])
    try:
        return prepare_for_training(model, args.lora_rank, args.grad_ckpt), proc
    except ValueError as e:
        raise UsageError(str(e)) from None


def start_ranks(args, preset: Preset):
    """Under torchrun: join the process group; each rank will hold one CoPD branch (parallel.py)."""
    if args.method != "copd":
        raise UsageError(f"under torchrun only --method copd runs (its branches are what the ranks "
                         f"split); run --method {args.method} as one process")
    if args.resume:
        raise UsageError("--resume is not available under torchrun: rerun, or run as one process")
    if preset.opd.loss != "sampled":
        raise UsageError(f"--opd-loss {preset.opd.loss} needs whole teacher distributions, which "
                         "ranks do not exchange: use --opd-loss sampled under torchrun")
    args.ckpt_every = 0   # checkpoints hold every branch: one process only
    try:
        layout = parallel.start(args.experts, args.dist_timeout)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.device.startswith("cuda"):
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return layout


def main(argv=None):
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        code = _main(args, rank)
    except parallel.PeerError as e:
        parallel.give_up(e)
    parallel.stop()
    return code


def _main(args, rank: int):
    layout = None
    try:
        preset = validate(args)
        # data and model load before OUT exists: bad input leaves nothing behind
        for domain, path in args.data.items():
            load_domain(domain, "train", 1, args.seed, preset.difficulty, args.data)
        if parallel.world_size() > 1:
            layout = start_ranks(args, preset)
        if layout is not None and rank > 0:   # rank 0 builds (or loads) π_0 first; the others then load it
            parallel.barrier("the warm start")
        model0, proc = load_base(args, preset)
        if layout is not None and rank == 0:
            parallel.barrier("the warm start")
        # seeded after π_0 exists: building it reseeds torch, loading it from the cache does not
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        if not proc.is_vl and set(args.experts) - {"text"}:
            raise UsageError(f"--model {args.model} is text-only: it cannot learn "
                             f"{', '.join(d for d in args.experts if d != 'text')}")
    except (UsageError, DataError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    writer = rank == 0
    tmp_out = writer and not os.path.exists(args.out)
    if writer:
        os.makedirs(args.out, exist_ok=True)
    try:
        run = Run(args, preset, model0, proc, layout)
        run.log(kind="config", args={k: v for k, v in vars(args).items()}, preset=asdict(preset))
        if writer:
            print(memory_plan(run, max(len(encode_prompt(proc, ex.prompt, ex.image, ex.video).ids)
                                       for d in run.domains for ex in run.train[d][:64])))
        run_methods(run)
        if writer:
            write_results(run)
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
        print(results_table(run))
        print(f"\nwrote {args.out}/results.json, results.md, curves.png, metrics.jsonl "
              f"({(time.time() - run.t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
