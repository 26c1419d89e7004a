"""
Co-Evolving Policy Distillation (the paper's Algorithm 1, Eq. 7-8).

K branches π^(0..K−1), all copies of π_0; branch k owns domain d_k. For N cycles:
  Phase I  (S_RL steps):  every branch does GRPO on its own domain (Eq. 7).
  Phase II (S_OPD steps): every branch k builds ONE batch from
              (a) a native GRPO batch on D_{d_k} (RLVR does not pause), and
              (b) for each neighbour j, its own rollouts on prompts of D_{d_j} with the
                  cross-branch token advantage  Â_t = β·(log π^(j)(y_t|·) − log π^(k)(y_t|·))  (Eq. 8),
           and takes one update. The teacher is branch j's weights at the start of the step:
           every batch of the step is built before any branch moves, so every branch is
           student and teacher in every step (bidirectional).
Finally the all-in-one model is the uniform average of the branches' parameters.

Neighbours: two branches teach each other; three or more are hub-and-spoke around the text
branch (the paper), or all pairs.
"""

import copy
import hashlib
import random
from dataclasses import dataclass

import torch

from opd import (OPDConfig, delta_stats, distribution_rows, opd_advantages, opd_batch, opd_rollout, rows_distance,
                 teacher_logprobs)
from memory import clone_policy, folded
from probes import drift, save_branches
from rlvr import PGBatch, RLConfig, grpo_batch, update
from rollout import Rollout

PHASE_I, PHASE_II = "rl", "opd"     # the names the schedule and the metrics log use


@dataclass
class CoPDConfig:
    cycles: int = 4                    # N
    rl_steps: int = 15                 # S_RL
    opd_steps: int = 10                # S_OPD   (the paper's best S_RL : S_OPD = 1.5 : 1)
    topology: str = "hub"              # "hub" (hub-and-spoke, the paper) | "all-pairs"
    hub: str = "text"


def budget_schedule(total_steps: int, cycles: int, ratio: float = 1.5):
    """(S_RL, S_OPD) with N·(S_RL + S_OPD) = total_steps and S_RL : S_OPD ≈ ratio : 1."""
    per_cycle = max(2, round(total_steps / cycles))
    opd_steps = min(per_cycle - 1, max(1, round(per_cycle / (1 + ratio))))   # each phase at least one step
    return per_cycle - opd_steps, opd_steps


def neighbours(domains: list, topology: str = "hub", hub: str = "text") -> dict:
    """Who teaches whom: {student domain: [teacher domains]}; never a branch itself."""
    if len(domains) < 2:
        raise ValueError("CoPD needs at least two experts (e.g. --experts text,image)")
    if topology == "all-pairs" or len(domains) == 2:
        return {d: [e for e in domains if e != d] for d in domains}
    if topology != "hub":
        raise ValueError(f"unknown topology '{topology}' (hub or all-pairs)")
    centre = hub if hub in domains else domains[0]
    return {d: ([e for e in domains if e != centre] if d == centre else [centre]) for d in domains}


def schedule(cfg: CoPDConfig) -> list:
    """Every step of every cycle as (cycle, phase, step_in_phase); the loop walks this list."""
    return [(c, phase, s) for c in range(cfg.cycles)
            for phase, n in ((PHASE_I, cfg.rl_steps), (PHASE_II, cfg.opd_steps)) for s in range(n)]


def describe(cfg: CoPDConfig, domains: list) -> str:
    """The plan printed at start, read off `schedule` (so it is the plan the loop walks)."""
    steps = schedule(cfg)
    cycles = sorted({c for c, _, _ in steps})
    first = [phase for c, phase, _ in steps if c == cycles[0]]
    teachers_of = neighbours(domains, cfg.topology, cfg.hub)
    lines = [f"CoPD schedule: {len(domains)} branches, {len(cycles)} cycles x "
             f"(Phase I {first.count(PHASE_I)} RLVR steps + Phase II {first.count(PHASE_II)} RLVR+OPD steps) "
             f"= {len(steps)} updates per branch"]
    lines += [f"  branch {d}: learns from {', '.join(teachers_of[d])}" for d in domains]
    return "\n".join(lines)


def merge_average(models: list):
    """θ = 1/K Σ_k θ^(k): a new model, the branches untouched (LoRA branches folded first)."""
    models = [folded(m) for m in models]
    merged = copy.deepcopy(models[0])
    with torch.no_grad():
        for param, *branch in zip(merged.parameters(), *(m.parameters() for m in models)):
            param.copy_(torch.stack([p.double() for p in branch]).mean(0).to(param.dtype))
    return merged


def branch_seed(step_seed, branch: str, replica: int = 0) -> int:
    """The seed of one branch's random stream in one step: its prompts and its samples come from
    it, so a branch trains the same whether it shares this process with the other branches or
    runs on ranks of its own (parallel.py; `replica` tells apart data-parallel copies)."""
    key = f"{step_seed}-{branch}" + (f"-{replica}" if replica else "")
    return int(hashlib.sha1(key.encode()).hexdigest()[:15], 16)


def prompt_indices(pools: dict, domain: str, n: int, rng: random.Random) -> list:
    """n training prompts of `domain` as indices into pools[domain] (indices cross the wire)."""
    return [rng.randrange(len(pools[domain])) for _ in range(n)]


# -----------------------------------------------------------------------------
# one step of one branch k: (a) its own batches, (b) its neighbours' grades, (c) one update

@dataclass
class NeighbourRollouts:
    """Branch k's own rollouts on the prompts of a neighbour j's domain (Phase II)."""
    prompt_idx: list                   # into pools[j]: indices cross the wire, not prompts
    rollout: Rollout
    row_domains: list                  # the domain of each row (routes it to its teacher)


@dataclass
class TeacherGrades:
    """Those rollouts graded by branch j: log π^(j) of each sampled token (N, L) and, on a few
    rows, its whole distribution {row: (L, V)}, or from another rank its top-k ids {row: (L, k)}."""
    rollout: Rollout
    teacher_lp: torch.Tensor
    teacher_full: dict | None
    teacher_top: dict | None = None

    @property
    def rows(self) -> dict:
        """{row: what the teacher gave beyond log-probs}: distributions, or top-k ids."""
        return self.teacher_full if self.teacher_top is None else self.teacher_top


@dataclass
class BranchBatches:
    """What branch k samples in one step, before any teacher is asked."""
    native: PGBatch                    # (a) its GRPO batch on its own domain (Eq. 7)
    stats: dict
    neighbour_rollouts: dict           # (b) {j: NeighbourRollouts}, Phase II only


def branch_batches(model, domain: str, proc, pools: dict, phase: str, teachers_of: dict, rl: RLConfig,
                   opd: OPDConfig, seed: int) -> BranchBatches:
    """Branch `domain`'s native GRPO batch and, in Phase II, its own rollouts on each
    neighbour's prompts, all drawn from the branch's stream `seed`."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    native, stats = grpo_batch(model, proc, [pools[domain][i] for i in prompt_indices(pools, domain, rl.prompts_per_step, rng)], rl)
    rollouts = {}
    if phase == PHASE_II:
        for j in teachers_of[domain]:
            idx = prompt_indices(pools, j, opd.prompts_per_step, rng)
            rollouts[j] = NeighbourRollouts(idx, *opd_rollout(model, proc, [pools[j][i] for i in idx], rl, opd))
    return BranchBatches(native, stats, rollouts)


def cross_branch_batch(grades: TeacherGrades, opd: OPDConfig) -> PGBatch:
    """Eq. 8: branch k's rollouts on neighbour j's prompts, with the cross-branch advantage
        Â_t = β·(log π^(j)(y_t|x, y_<t) − log π^(k)(y_t|x, y_<t)),
    π^(j) as it was at the start of the step, π^(k) the sampler's (π_old). The exact-KL
    ablations (`--opd-loss full|topk`) put opd.py's reverse KL in place of the surrogate."""
    r = grades.rollout
    if opd.loss == "sampled":
        return PGBatch(r, opd_advantages(r.logprobs, grades.teacher_lp, opd.beta))
    return opd_batch(r, grades.teacher_lp, grades.teacher_full, opd)


def branch_update(model, optimizer, proc, own: BranchBatches, grades: dict, rl: RLConfig, opd: OPDConfig,
                  sync_grads=None) -> dict:
    """One update of branch k on its native batch and, in Phase II, on its rollouts graded by each
    neighbour ({j: TeacherGrades}): the GRPO and OPD advantages in one clipped surrogate."""
    batches, stats = [own.native], own.stats
    batches += [cross_branch_batch(g, opd) for g in grades.values()]
    delta = {j: delta_stats(g.rollout, g.teacher_lp) for j, g in grades.items()}
    graded_rows = {1 + n: set(g.rows) for n, g in enumerate(grades.values())}
    result, seen = update(model, optimizer, proc, batches, rl, sync_grads, graded_rows)
    stats.update(seen[0])
    for n, (j, g) in enumerate(grades.items(), 1):
        delta[j].update(rows_distance(seen[n].get("student", {}), g.rows, g.rollout.mask, opd.overlap_k))
    stats.update(result)
    for j, d in delta.items():
        stats.update({f"{k}_from_{j}": v for k, v in d.items()})
    return stats


class Branches:
    """CoPD's K branches, all in this process. parallel.RankBranches offers the same calls with
    one branch per rank under torchrun; train.train_copd drives either without asking which."""

    def __init__(self, model0, domains: list, teachers_of: dict, make_optimizer, name: str = "copd"):
        self.teachers_of, self.name = teachers_of, name
        self.models = {d: clone_policy(model0) for d in domains}
        self.optimizers = {d: make_optimizer(m) for d, m in self.models.items()}

    def by_name(self) -> tuple:
        """({"<name>:<domain>": model}, {"<name>:<domain>": optimizer}) of the branches held here."""
        return ({f"{self.name}:{d}": m for d, m in self.models.items()},
                {f"{self.name}:{d}": o for d, o in self.optimizers.items()})

    def sample(self, proc, pools: dict, phase: str, rl: RLConfig, opd: OPDConfig, step_seed) -> dict:
        """(a) {k: BranchBatches}: every branch's GRPO batch and, in Phase II, its rollouts on
        each neighbour's prompts, all sampled before any branch moves."""
        return {d: branch_batches(m, d, proc, pools, phase, self.teachers_of, rl, opd, branch_seed(step_seed, d))
                for d, m in self.models.items()}

    def grade(self, proc, own: dict, rl: RLConfig, opd: OPDConfig) -> dict:
        """(b) {k: {j: TeacherGrades}}: branch j grades branch k's rollouts on j's prompts with
        the weights it has at the start of the step (every branch is student and teacher)."""
        return {d: {j: TeacherGrades(r.rollout, *teacher_logprobs({j: self.models[j]}, proc, r.rollout, r.row_domains,
                                                                   rl, distribution_rows(opd, r.rollout)))
                    for j, r in b.neighbour_rollouts.items()}
                for d, b in own.items()}

    def update(self, proc, own: dict, grades: dict, rl: RLConfig, opd: OPDConfig) -> dict:
        """(c) One update of every branch (`branch_update`); returns {k: stats}."""
        return {d: branch_update(self.models[d], self.optimizers[d], proc, b, grades[d], rl, opd)
                for d, b in own.items()}

    def measure(self, measure, models: dict) -> dict:
        """{name: measure(name, model)}: one process measures everything."""
        return {name: measure(name, m) for name, m in models.items()}

    def divergence_pairs(self, model0) -> list:
        """(pair, student, teacher, domain) for the divergence probes: neighbouring branches, and
        each branch against π_0, on the student's domain."""
        out = []
        for a, model in self.models.items():
            out += [(f"{a}~{b}", model, self.models[b], a) for b in self.teachers_of[a] if a < b]
            out.append((f"{a}~base", model, model0, a))
        return out

    def drift(self, model0) -> dict:
        """probes.drift: each linked pair's distance and each branch's from π_0, over ‖θ_0‖."""
        pairs = [(a, b) for a in self.models for b in self.teachers_of[a] if a < b]
        return drift(self.models, model0, pairs)

    def save(self, folder: str):
        save_branches(self.models, folder)

    def all_branches(self) -> dict:
        """{domain: model}: every branch is in this process (the end-of-stage probes need them)."""
        return self.models

    def merge(self):
        return merge_average(list(self.models.values()))
