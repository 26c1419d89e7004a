"""
On-policy distillation (the paper's Eq. 1/4): the student π_θ samples, the teacher π_T grades
every token the student sampled with one teacher-forced pass (no grad).

  δ_t = log π_T(y_t | x, y_<t) − log π_θ(y_t | x, y_<t)
  Â_t = β·δ_t                                                  into the clipped surrogate of rlvr.py

The direction of the KL. The paper's preliminaries write the objective over the vocabulary as
KL(π_T‖π_θ); its algorithm trains on δ_t at the tokens the student sampled, and E_{y~π_θ}[δ_t]
= −KL(π_θ‖π_T): the reverse KL, mode-seeking, which is what on-policy distillation minimises
(the student is corrected where it goes, not everywhere the teacher puts mass). We follow the
algorithm. `--opd-loss sampled` (default) uses Â_t; `full` minimises the exact reverse KL over
the vocabulary at every student position, `topk` the same sum over the student's top-k tokens
only (ablations). Each prompt is routed to its own domain's teacher, which makes multi-teacher
OPD (MOPD) and CoPD's cross-branch OPD the same function.

Also here: the behavioural distance between two policies on the student's own rollouts, the
paper's top-k overlap (Eq. 6) and a symmetric KL (the paper names it, never defines it; ours
is KL(p‖q) + KL(q‖p) over the full vocabulary, averaged over positions), computed by one
function, `distance`, for the probes and for the OPD steps' own statistics.

Shapes: N rows (prompts × samples), L response positions, V the vocabulary.
"""

from dataclasses import dataclass
from functools import partial

import torch

from policy import prompt_of
from rlvr import PGBatch, RLConfig, update
from rollout import generate, response_logprobs, token_logprobs


@dataclass
class OPDConfig:
    beta: float = 1.0                  # β of Â_t = β·δ_t (the paper names β_k, gives no value); --opd-beta
    loss: str = "sampled"              # "sampled" | "full" | "topk"
    loss_topk: int = 10                # k for the `topk` loss
    overlap_k: int = 10                # k of the top-k overlap metric (the paper's k = 10)
    prompts_per_step: int = 8
    samples_per_prompt: int = 8        # the paper's 8
    metric_rows: int = 32              # rows whose full teacher distribution is kept for the metrics


# -----------------------------------------------------------------------------
# the equations

def opd_advantages(student_logp, teacher_logp, beta: float = 1.0):
    """Â_t = β·δ_t = β·(log π_T(y_t|x,y_<t) − log π_θ(y_t|x,y_<t)), a constant (detached)."""
    return (beta * (teacher_logp - student_logp)).detach()


def reverse_kl_full(student_logp_all, teacher_logp_all):
    """KL(π_θ‖π_T)(s_t) = Σ_v π_θ(v|s_t) (log π_θ(v|s_t) − log π_T(v|s_t)) per position."""
    p = student_logp_all.exp()
    diff = student_logp_all - teacher_logp_all.detach()
    return (p * diff.masked_fill(p == 0, 0.0)).sum(-1)


def reverse_kl_topk(student_logp_all, teacher_logp_all, k: int = 10):
    """The reverse KL on the student's top-k tokens V_k(s_t), both distributions renormalised
    over V_k (as TRL's top-k distillation does): with π̃(v) = π(v) / Σ_{u∈V_k} π(u),
    Σ_{v∈V_k} π̃_θ(v|s_t) (log π̃_θ(v|s_t) − log π̃_T(v|s_t)). A true KL, so ≥ 0 and 0 when the
    teacher ranks V_k as the student does; without renormalising, a teacher that puts its mass
    elsewhere could make the sum negative."""
    top = student_logp_all.topk(k, dim=-1).indices
    s = student_logp_all.gather(-1, top)
    t = teacher_logp_all.detach().gather(-1, top).clamp(min=-1e4)   # a masked teacher id is a large gap
    s, t = s.log_softmax(-1), t.log_softmax(-1)
    return (s.exp() * (s - t)).sum(-1)


def topk_overlap(p_logp_all, q_logp_all, k: int = 10):
    """O_k(s) = |Top_k(p(·|s)) ∩ Top_k(q(·|s))| / k per position (Eq. 6)."""
    return overlap_of_ids(p_logp_all.topk(k, dim=-1).indices, q_logp_all.topk(k, dim=-1).indices)


def overlap_of_ids(a, b):
    """|a ∩ b| / k for two (..., k) sets of token ids."""
    return (a[..., :, None] == b[..., None, :]).any(-1).float().mean(-1)


def symmetric_kl(p_logp_all, q_logp_all):
    """KL(p‖q) + KL(q‖p) = Σ_v (p(v) − q(v)) (log p(v) − log q(v)) per position."""
    p, q = p_logp_all.exp(), q_logp_all.exp()
    diff = (p_logp_all - q_logp_all).masked_fill((p == 0) & (q == 0), 0.0)
    return ((p - q) * diff.clamp(-1e4, 1e4)).sum(-1)


def distance(student_logp_all, teacher, mask, k: int = 10) -> dict:
    """The mean over the positions where mask (n, L) is 1 of the top-k overlap, and of the
    symmetric KL when `teacher` holds distributions (n, L, V); given only the teacher's top-k
    ids (n, L, k) (from another rank), the overlap alone."""
    total = mask.sum()
    if not teacher.is_floating_point():
        return {"overlap": float((overlap_of_ids(student_logp_all.topk(k, dim=-1).indices, teacher) * mask).sum() / total)}
    return {"overlap": float((topk_overlap(student_logp_all, teacher, k) * mask).sum() / total),
            "sym_kl": float((symmetric_kl(student_logp_all, teacher) * mask).sum() / total)}


# -----------------------------------------------------------------------------
# the teacher's grades and one OPD batch

@torch.no_grad()
def teacher_logprobs(teachers: dict, proc, rollout, domains: list, rl: RLConfig, distribution_rows: int):
    """Each row scored by its own domain's teacher: log π_T of every sampled token (N, L), and
    {row: log π_T(·|s_t) (L, V)} for the first `distribution_rows` rows (the exact losses and
    the metrics need whole distributions)."""
    N = rollout.response.shape[0]
    token_lp = torch.zeros(N, rollout.response.shape[1], device=rollout.response.device)
    full = {}
    for domain, teacher in teachers.items():
        rows = [i for i in range(N) if domains[i] == domain]
        for start in range(0, len(rows), rl.micro_batch):
            chunk = rows[start:start + rl.micro_batch]
            logp_all = response_logprobs(teacher, proc, [rollout.prompts[i] for i in chunk], rollout.response[chunk],
                                         rl.sampling)
            token_lp[chunk] = token_logprobs(logp_all, rollout.response[chunk])
            for j, i in enumerate(chunk):
                if i < distribution_rows:
                    full[i] = logp_all[j]
    return token_lp * rollout.mask, full


def opd_rollout(student, proc, examples: list, rl: RLConfig, cfg: OPDConfig):
    """The student's own samples on `examples` (the on-policy half of OPD) and each row's domain."""
    prompts = [prompt_of(proc, ex) for ex in examples]
    rollout = generate(student, proc, prompts, cfg.samples_per_prompt, rl.sampling)
    return rollout, [ex.domain for ex in examples for _ in range(cfg.samples_per_prompt)]


def distribution_rows(cfg: OPDConfig, rollout) -> int:
    """How many rows need the teacher's whole distribution: every row for the exact losses,
    `metric_rows` for the metrics of the sampled one."""
    return rollout.mask.shape[0] if cfg.loss != "sampled" else cfg.metric_rows


def exact_kl(teacher_full: dict, cfg: OPDConfig, logp_all, rows: slice):
    """β·KL(π_θ‖π_T) per position of rows `rows`, over the vocabulary (`full`) or the student's
    top-k (`topk`): logp_all (n, L, V) -> (n, L)."""
    t = torch.stack([teacher_full[i] for i in range(rows.start, rows.stop)])
    if cfg.loss == "full":
        return cfg.beta * reverse_kl_full(logp_all, t)
    return cfg.beta * reverse_kl_topk(logp_all, t, cfg.loss_topk)


def opd_batch(rollout, teacher_lp, teacher_full: dict | None, cfg: OPDConfig) -> PGBatch:
    """The OPD batch of a scored rollout: Â_t = β·δ_t for the surrogate (`sampled`), or the
    exact reverse KL against teacher_full ({row: (L, V)}, every row) for `full` and `topk`."""
    if cfg.loss == "sampled":
        return PGBatch(rollout, opd_advantages(rollout.logprobs, teacher_lp, cfg.beta))
    if cfg.loss not in ("full", "topk"):
        raise ValueError(f"unknown OPD loss '{cfg.loss}' (sampled, full or topk)")
    if teacher_full is None:
        raise ValueError(f"the {cfg.loss} OPD loss needs the teacher's full distribution")
    return PGBatch(rollout, None, exact_loss=partial(exact_kl, teacher_full, cfg))


def delta_stats(rollout, teacher_lp) -> dict:
    """The mean δ_t per token (≈ −KL(π_θ‖π_T)) and the tokens the teacher graded."""
    delta = (teacher_lp - rollout.logprobs) * rollout.mask
    return {"opd_delta": float(delta.sum() / rollout.mask.sum()), "opd_tokens": int(rollout.mask.sum())}


def rows_distance(student: dict, teacher: dict, mask, k: int) -> dict:
    """`distance` over the rows both {row: (L, ·)} hold: the student's distribution at the
    update's own forward against the teacher's distribution (or top-k ids)."""
    rows = sorted(set(student) & set(teacher))
    if not rows:
        return {}
    return distance(torch.stack([student[i] for i in rows]), torch.stack([teacher[i] for i in rows]), mask[rows], k)


def opd_step(student, optimizer, teachers: dict, proc, examples: list, rl: RLConfig, cfg: OPDConfig) -> dict:
    """One OPD update: student rollouts on `examples`, each graded by teachers[example.domain]
    (static OPD: one teacher; MOPD: one per domain)."""
    missing = {ex.domain for ex in examples} - set(teachers)
    if missing:
        raise ValueError(f"no teacher for domain(s) {sorted(missing)}")
    rollout, domains = opd_rollout(student, proc, examples, rl, cfg)
    teacher_lp, teacher_full = teacher_logprobs(teachers, proc, rollout, domains, rl, distribution_rows(cfg, rollout))
    stats = delta_stats(rollout, teacher_lp)
    result, (seen,) = update(student, optimizer, proc, [opd_batch(rollout, teacher_lp, teacher_full, cfg)], rl,
                             measure_rows={0: set(teacher_full)})
    stats.update(rows_distance(seen.get("student", {}), teacher_full, rollout.mask, cfg.overlap_k))
    stats.update(result)
    return stats


@torch.no_grad()
def divergence(student, teacher, proc, examples: list, rl: RLConfig, k: int = 10, samples: int = 2) -> dict:
    """Top-k overlap and symmetric KL of two policies over the student's own rollouts."""
    prompts = [prompt_of(proc, ex) for ex in examples]
    rollout = generate(student, proc, prompts, samples, rl.sampling)
    s = response_logprobs(student, proc, rollout.prompts, rollout.response, rl.sampling)
    t = response_logprobs(teacher, proc, rollout.prompts, rollout.response, rl.sampling)
    return distance(s, t, rollout.mask, k)
