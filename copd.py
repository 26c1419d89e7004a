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

from opd import OPDConfig, opd_loss, opd_rollout, rows_to_keep, teacher_logprobs
from memory import clone_policy, folded
from rlvr import PGBatch, RLConfig, grpo_batch, update
from rollout import Rollout


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
    opd_steps = max(1, round(per_cycle / (1 + ratio)))
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
            for phase, n in (("rl", cfg.rl_steps), ("opd", cfg.opd_steps)) for s in range(n)]


def describe(cfg: CoPDConfig, domains: list) -> str:
    """The plan printed at start, read off `schedule` (so it is the plan the loop walks)."""
    steps = schedule(cfg)
    cycles = sorted({c for c, _, _ in steps})
    first = [phase for c, phase, _ in steps if c == cycles[0]]
    links = neighbours(domains, cfg.topology, cfg.hub)
    lines = [f"CoPD schedule: {len(domains)} branches, {len(cycles)} cycles x "
             f"(Phase I {first.count('rl')} RLVR steps + Phase II {first.count('opd')} RLVR+OPD steps) "
             f"= {len(steps)} updates per branch"]
    lines += [f"  branch {d}: learns from {', '.join(links[d])}" for d in domains]
    return "\n".join(lines)


def merge_average(models: list):
    """θ = 1/K Σ_k θ^(k): a new model, the branches untouched (LoRA branches folded first)."""
    models = [folded(m) for m in models]
    merged = copy.deepcopy(models[0])
    with torch.no_grad():
        for param, *branch in zip(merged.parameters(), *(m.parameters() for m in models)):
            param.copy_(torch.stack([p.double() for p in branch]).mean(0).to(param.dtype))
    return merged


def branch_seed(step_seed: int, branch: str, replica: int = 0) -> int:
    """The seed of one branch's random stream in one step: its prompts and its samples come from
    it, so a branch trains the same whether it shares this process with the other branches or
    runs on ranks of its own (parallel.py; `replica` tells apart data-parallel copies)."""
    key = f"{step_seed}-{branch}" + (f"-{replica}" if replica else "")
    return int(hashlib.sha1(key.encode()).hexdigest()[:15], 16)


def draw(pools: dict, domain: str, n: int, rng: random.Random) -> list:
    """n training prompts of `domain` as indices into pools[domain] (indices cross the wire)."""
    return [rng.randrange(len(pools[domain])) for _ in range(n)]


@dataclass
class OPDRollouts:
    """A student's own rollouts on the prompts of one neighbour's domain."""
    prompt_idx: list                   # into pools[teacher domain]: indices cross the wire, not prompts
    rollout: Rollout
    row_domains: list                  # the domain of each row (routes it to its teacher)


@dataclass
class Scored:
    """Those rollouts with the teacher's log-probs of the sampled tokens (and, for the metrics,
    its full distribution or its top-k ids on a few rows)."""
    rollout: Rollout
    teacher_lp: torch.Tensor
    teacher_full: dict | None
    teacher_top: dict | None = None


@dataclass
class StudentSide:
    """A branch's share of one step before any teacher is asked."""
    native: PGBatch                    # (a) its GRPO batch on its own domain
    stats: dict
    rollouts: dict                     # (b) {teacher domain: OPDRollouts}, Phase II only


def student_side(model, domain: str, proc, pools: dict, phase: str, links: dict, rl: RLConfig, opd: OPDConfig,
                 seed: int) -> StudentSide:
    """Branch `domain`'s native GRPO batch and, in Phase II, its own rollouts on each
    neighbour's prompts, all drawn from the branch's stream `seed`."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    native, stats = grpo_batch(model, proc, [pools[domain][i] for i in draw(pools, domain, rl.prompts_per_step, rng)], rl)
    rollouts = {}
    if phase == "opd":
        for j in links[domain]:
            idx = draw(pools, j, opd.prompts_per_step, rng)
            rollouts[j] = OPDRollouts(idx, *opd_rollout(model, proc, [pools[j][i] for i in idx], rl, opd))
    return StudentSide(native, stats, rollouts)


def finish_step(model, optimizer, proc, side: StudentSide, scored: dict, rl: RLConfig, opd: OPDConfig,
                sync_grads=None) -> dict:
    """One update of one branch on its native batch and its scored OPD rollouts {teacher domain: Scored}."""
    batches, opd_stats, stats = [side.native], {}, side.stats
    for j, s in scored.items():
        batch, opd_stats[j] = opd_loss(s.rollout, s.teacher_lp, s.teacher_full, rl, opd, s.teacher_top)
        batches.append(batch)
    stats.update(update(model, optimizer, proc, batches, rl, sync_grads))
    for j, o in opd_stats.items():   # the overlap metrics filled in during backward
        stats.update({f"{k}_from_{j}": v for k, v in o.items()})
    return stats


class Branches:
    """CoPD's K branches, all in this process. parallel.RankBranches offers the same calls with
    one branch per rank under torchrun; train.train_copd drives either without asking which."""

    def __init__(self, model0, domains: list, links: dict, make_optimizer, name: str = "copd"):
        self.links, self.name = links, name
        self.models = {d: clone_policy(model0) for d in domains}
        self.optimizers = {d: make_optimizer(m) for d, m in self.models.items()}

    def named(self) -> tuple:
        """({"<name>:<domain>": model}, {"<name>:<domain>": optimizer}) of the branches held here."""
        return ({f"{self.name}:{d}": m for d, m in self.models.items()},
                {f"{self.name}:{d}": o for d, o in self.optimizers.items()})

    def step(self, proc, pools: dict, phase: str, rl: RLConfig, opd: OPDConfig, step_seed) -> dict:
        """One update of every branch; returns {domain: stats}. Phase II builds every branch's
        batches first, so each teacher is as it was at step start (bidirectional)."""
        sides = {d: student_side(m, d, proc, pools, phase, self.links, rl, opd, branch_seed(step_seed, d))
                 for d, m in self.models.items()}
        scored = {d: {j: Scored(r.rollout, *teacher_logprobs({j: self.models[j]}, proc, r.rollout, r.row_domains, rl,
                                                             rows_to_keep(opd, r.rollout)))
                      for j, r in side.rollouts.items()}
                  for d, side in sides.items()}
        return {d: finish_step(self.models[d], self.optimizers[d], proc, side, scored[d], rl, opd)
                for d, side in sides.items()}

    def measure(self, measure, models: dict) -> dict:
        """{name: measure(name, model)}: one process measures everything."""
        return {name: measure(name, m) for name, m in models.items()}

    def probes(self, model0) -> list:
        """(pair, student, teacher, domain) for the divergence probes: neighbouring branches, and
        each branch against π_0, on the student's domain."""
        out = []
        for a, model in self.models.items():
            out += [(f"{a}~{b}", model, self.models[b], a) for b in self.links[a] if a < b]
            out.append((f"{a}~base", model, model0, a))
        return out

    def merge(self):
        return merge_average(list(self.models.values()))
