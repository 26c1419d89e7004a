"""
CoPD across processes: the paper's parallel branches as one process group per branch.

    torchrun --nproc_per_node 2 train.py --experts text,image --method copd    # a branch per rank
    torchrun --nproc_per_node 4 train.py --experts text,image --method copd    # 2 replicas per branch

With W ranks and K branches (W a multiple of K) every branch has R = W/K data-parallel replicas:
rank r holds branch r // R, replica r % R. What crosses the wire, and when:

  Phase I   GRPO on the branch's own domain. No traffic, but for the replicas of a branch
            averaging their gradients (one all_reduce of the parameters' size per update).
  Phase II  Each rank samples its rollouts on its teachers' prompts, then
              1. all_gather: (teacher domain, prompt indices, response ids, masks) of every rank;
              2. each rank scores, with its own weights, the rollouts addressed to it (its domain,
                 same replica index): per-token teacher log-probs, and the top-k ids of the
                 metric rows (the overlap needs no more);
              3. all_gather of those answers; each student takes its own.
            Prompts travel as indices: every rank holds the same prompt pools.
  Merge     all_reduce of the parameters (in float64), divided by W: the uniform average.

Each branch draws its prompts and samples from its own stream (copd.branch_seed), so a branch
trains exactly as it would in a single process: tests/test_parallel.py checks that results.json
of a 2-rank run equals the single-process one. A rank that dies or stalls makes the others
raise PeerError (the collectives time out after --dist-timeout seconds) instead of hanging.
"""

import copy
import os
import sys
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from config import UsageError
from settings import Settings
from copd import PHASE_II, TeacherGrades, branch_batches, branch_seed, branch_update
from opd import distribution_rows, teacher_logprobs
from memory import clone_policy, folded
from policy import prompt_of
from probes import drift, save_branches
from rollout import Rollout


class PeerError(RuntimeError):
    """Another rank died or stopped answering: training cannot go on."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Layout:
    """Who holds what: rank -> (branch, replica), and the process group of each branch."""
    rank: int
    world: int
    domains: list
    groups: list                   # one process group per branch (its replicas)

    @property
    def replicas(self) -> int:
        return self.world // len(self.domains)

    @property
    def branch(self) -> str:
        return self.domains[self.rank // self.replicas]

    @property
    def replica(self) -> int:
        return self.rank % self.replicas

    def rank_of(self, branch: str, replica: int) -> int:
        return self.domains.index(branch) * self.replicas + replica


def check_ranks(settings: Settings) -> Settings:
    """Under torchrun: refuse what one branch per rank rules out; no checkpoints (one holds every
    branch), and each rank on its own GPU."""
    if settings.method not in ("copd", "copd@equal"):
        raise UsageError(f"under torchrun only --method copd or copd@equal runs (its branches are what the ranks "
                         f"split); run --method {settings.method} as one process")
    if settings.resume:
        raise UsageError("--resume is not available under torchrun: rerun, or run as one process")
    if settings.preset.opd.loss != "sampled":
        raise UsageError(f"--opd-loss {settings.preset.opd.loss} needs whole teacher distributions, which "
                         "ranks do not exchange: use --opd-loss sampled under torchrun")
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if settings.device.startswith("cuda") else settings.device
    return replace(settings, ckpt_every=0, device=device)


def start(domains: list, timeout_s: float) -> Layout:
    """Join the process group torchrun set up (gloo on CPU, NCCL on GPUs)."""
    world = world_size()
    if world % len(domains):
        raise ValueError(f"{world} ranks do not split evenly over {len(domains)} branches "
                         f"({', '.join(domains)}): use a multiple of {len(domains)}")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    replicas = world // len(domains)
    # every rank creates every group, in the same order (torch.distributed requires it)
    groups = [dist.new_group(list(range(k * replicas, (k + 1) * replicas))) for k in range(len(domains))]
    return Layout(dist.get_rank(), world, list(domains), groups)


def stop(code: int):
    """Leave together, then exit without tearing the process group down: a rank whose peer has
    already closed its connections can abort inside gloo's threads ("terminate called without an
    active exception"), even after a barrier (seen on 2 busy cores). Every file is written and
    closed or flushed by then."""
    if dist.is_initialized():
        barrier("the end of the run")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def give_up(error: PeerError, code: int = 4):
    """Print the error and leave at once: the process group's threads may still be waiting on
    the lost rank, and tearing them down the normal way can hang or abort."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def _collective(what: str, fn):
    try:
        return fn()
    except (RuntimeError, ValueError, OSError) as e:   # gloo and NCCL raise RuntimeError subclasses
        raise PeerError(f"rank {dist.get_rank()}: lost the other ranks during {what} "
                        f"({str(e).strip().splitlines()[0][:200]})") from None


def gather(obj, what: str) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    out = [None] * dist.get_world_size()
    _collective(what, lambda: dist.all_gather_object(out, obj))
    return out


def barrier(what: str):
    _collective(what, dist.barrier)


# -----------------------------------------------------------------------------
# this rank's branch

def average_gradients(layout: Layout, model):
    """The replicas of a branch average their gradients: one flat all_reduce."""
    params = list(model.parameters())
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    _collective("the gradient average", lambda: dist.all_reduce(flat, group=layout.groups[layout.domains.index(layout.branch)]))
    flat /= layout.replicas
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def grade_for_others(layout: Layout, model, proc, pools: dict, rollouts: dict, rl, opd) -> dict:
    """Phase II's exchange. rollouts: {teacher domain: copd.NeighbourRollouts} of this rank's
    student. Returns {teacher domain: copd.TeacherGrades} with the teacher's log-probs and top-k ids."""
    device = next(model.parameters()).device
    asks = [(j, r.prompt_idx, r.rollout.response.cpu(), r.rollout.mask.cpu()) for j, r in rollouts.items()]
    everyone = gather(asks, "the Phase II rollout exchange")
    answers = {}
    for src, src_asks in enumerate(everyone):
        if src % layout.replicas != layout.replica:
            continue
        for j, idx, response, mask in src_asks:
            if j != layout.branch:
                continue
            n = response.shape[0] // len(idx)
            prompts = [prompt_of(proc, pools[j][i]) for i in idx]
            rollout = Rollout([p for p in prompts for _ in range(n)], response.to(device), None, mask.to(device), [], n)
            lp, full = teacher_logprobs({j: model}, proc, rollout, [j] * response.shape[0], rl,
                                        distribution_rows(opd, rollout))
            top = {row: f.topk(opd.overlap_k, dim=-1).indices.cpu() for row, f in full.items()}
            answers[src] = (lp.cpu(), top)
    replies = gather(answers, "the return of teacher log-probs")
    grades = {}
    for j, r in rollouts.items():
        lp, top = replies[layout.rank_of(j, layout.replica)][layout.rank]
        grades[j] = TeacherGrades(r.rollout, lp.to(device), None, {row: t.to(device) for row, t in top.items()})
    return grades


class RankBranches:
    """This rank's branch, with the calls of copd.Branches: `step` and `measure` return what
    every branch did (gathered from the ranks), `merge` the average of all of them."""

    def __init__(self, layout: Layout, model0, teachers_of: dict, make_optimizer, name: str, pools: dict):
        self.layout, self.teachers_of, self.name = layout, teachers_of, name
        self.pools = pools   # every rank holds the same prompt pools: prompts cross the wire as indices
        d = layout.branch
        self.models = {d: clone_policy(model0)}
        self.optimizers = {d: make_optimizer(self.models[d])}

    def by_name(self) -> tuple:
        d = self.layout.branch
        return {f"{self.name}:{d}": self.models[d]}, {f"{self.name}:{d}": self.optimizers[d]}

    def sample(self, proc, pools: dict, phase: str, rl, opd, step_seed) -> dict:
        """This rank's share of copd.Branches.sample: the same batches, for its branch only."""
        d = self.layout.branch
        if phase == PHASE_II and opd.loss != "sampled":
            raise ValueError(f"across ranks CoPD sends per-token teacher log-probs only: the {opd.loss} "
                             "OPD loss needs whole distributions (use --opd-loss sampled)")
        return {d: branch_batches(self.models[d], d, proc, pools, phase, self.teachers_of, rl, opd,
                                  branch_seed(step_seed, d, self.layout.replica))}

    def grade(self, proc, own: dict, rl, opd) -> dict:
        """Phase II's exchange (`grade_for_others`): this rank grades the rollouts addressed to its
        branch and receives the grades of its own rollouts."""
        d = self.layout.branch
        return {d: grade_for_others(self.layout, self.models[d], proc, self.pools, own[d].neighbour_rollouts, rl, opd)}

    def update(self, proc, own: dict, grades: dict, rl, opd) -> dict:
        """This rank's branch takes its update; every rank learns every branch's statistics."""
        layout, d = self.layout, self.layout.branch
        sync = (lambda m: average_gradients(layout, m)) if layout.replicas > 1 else None
        stats = branch_update(self.models[d], self.optimizers[d], proc, own[d], grades[d], rl, opd, sync)
        return {b: s for b, r, s in gather((d, layout.replica, stats), "the step's statistics") if r == 0}

    def measure(self, measure, models: dict) -> dict:
        """A branch is measured by its first replica, any other model (the merge) by rank 0;
        every rank learns every result."""
        own = f"{self.name}:{self.layout.branch}"
        mine = {name: measure(name, m) for name, m in models.items()
                if (self.layout.replica == 0 if name == own else self.layout.rank == 0)}
        return {name: accs for part in gather(mine, "an evaluation") for name, accs in part.items()}

    def divergence_pairs(self, model0) -> list:
        """None: the probes need two branches in one process; across ranks the OPD batches' own
        overlap (overlap_from_* in the step's statistics) is the measure."""
        return []

    def drift(self, model0) -> dict:
        """Each branch's distance from π_0 over ‖θ_0‖ (probes.drift); a pair's distance needs
        both branches in one process, so across ranks it is not measured."""
        d = self.layout.branch
        mine = drift({d: self.models[d]}, model0, []) if self.layout.replica == 0 else {}
        return {k: v for part in gather(mine, "the drift probe") for k, v in part.items()}

    def save(self, folder: str):
        """Each branch's first replica writes its own file."""
        if self.layout.replica == 0:
            save_branches(self.models, folder)

    def all_branches(self) -> None:
        """None: the ensemble and interpolation probes need every branch in one process."""
        return None

    def merge(self):
        """θ = 1/K Σ_k θ^(k) as one all_reduce (replicas hold equal weights, so dividing the sum
        over all W ranks by W is the same average). Float64, as copd.merge_average."""
        merged = copy.deepcopy(folded(self.models[self.layout.branch]))   # LoRA: adapters folded first
        with torch.no_grad():
            for p in merged.parameters():
                total = p.detach().double()
                _collective("the final merge", lambda: dist.all_reduce(total))
                p.copy_((total / self.layout.world).to(p.dtype))
        return merged
