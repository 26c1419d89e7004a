"""
On-policy distillation (the paper's Eq. 1/4): the student π_θ samples, the teacher π_T grades
every token the student sampled with one teacher-forced pass (no grad).

  δ_t = log π_T(y_t | x, y_<t) − log π_θ(y_t | x, y_<t)        one-sample estimate of −KL(π_θ‖π_T)
  Â_t = β·δ_t                                                  into the clipped surrogate of rlvr.py

`--opd-loss sampled` (default, the paper's algorithm) uses Â_t; `full` minimises the exact
reverse KL over the vocabulary at every student position, `topk` the same sum over the
student's top-k tokens only (ablations). Each prompt is routed to its own domain's teacher,
which makes multi-teacher OPD (MOPD) and CoPD's cross-branch OPD the same function.

Also here: the behavioural distance between two policies on the student's own rollouts, the
paper's top-k overlap (Eq. 6) and a symmetric KL (the paper names it, never defines it; ours
is KL(p‖q) + KL(q‖p) over the full vocabulary, averaged over positions).
"""

from dataclasses import dataclass

import torch

from policy import prompt_of
from rlvr import PGBatch, RLConfig, surrogate_loss
from rollout import generate, response_logits, sampling_logprobs, token_logprobs


@dataclass
class OPDConfig:
    # β (the paper's β_k, no value given): Phase II puts β·δ_t in the same update as the GRPO
    # advantages, which are standardised per group (|Â| ≈ 1 where a group has signal), while δ_t
    # averages −0.06 nats per token on the cpu preset (−0.6 at most): at β = 1 the teachers
    # nudge and the reward leads. `--opd-beta` sets it.
    beta: float = 1.0
    loss: str = "sampled"              # "sampled" | "full" | "topk"
    loss_topk: int = 10                # k for the `topk` loss
    overlap_k: int = 10                # k of the top-k overlap metric (the paper's k = 10)
    prompts_per_step: int = 8
    samples_per_prompt: int = 8        # the paper's 8; 8 x 8 rows cost what 16 x 4 did
    metric_rows: int = 32              # rows whose full teacher distribution is kept for metrics


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


# -----------------------------------------------------------------------------
# scoring and one OPD batch

@torch.no_grad()
def teacher_logprobs(teachers: dict, proc, rollout, domains: list, rl: RLConfig, keep_rows: int):
    """Each row scored by its own domain's teacher: token log-probs (N, T) and the full
    distribution of the first `keep_rows` rows (for the full/topk losses and the metrics)."""
    N, T = rollout.response.shape
    token_lp = torch.zeros(N, T, device=rollout.response.device)
    full = {}
    for domain, teacher in teachers.items():
        rows = [i for i in range(N) if domains[i] == domain]
        for start in range(0, len(rows), rl.micro_batch):
            chunk = rows[start:start + rl.micro_batch]
            logits = response_logits(teacher, proc, [rollout.prompts[i] for i in chunk], rollout.response[chunk])
            logp_all = sampling_logprobs(logits, rl.sampling, proc)
            token_lp[chunk] = token_logprobs(logp_all, rollout.response[chunk])
            for j, i in enumerate(chunk):
                if i < keep_rows:
                    full[i] = logp_all[j]
    return token_lp * rollout.mask, full


def opd_rollout(student, proc, examples: list, rl: RLConfig, cfg: OPDConfig):
    """The student's own samples on `examples` (the on-policy half of OPD) and each row's domain."""
    prompts = [prompt_of(proc, ex) for ex in examples]
    rollout = generate(student, proc, prompts, cfg.samples_per_prompt, rl.sampling)
    return rollout, [ex.domain for ex in examples for _ in range(cfg.samples_per_prompt)]


def rows_to_keep(cfg: OPDConfig, rollout) -> int:
    """Rows whose full teacher distribution the loss (full, topk) or the metrics need."""
    return rollout.mask.shape[0] if cfg.loss != "sampled" else cfg.metric_rows


def opd_loss(rollout, teacher_lp, teacher_full: dict, rl: RLConfig, cfg: OPDConfig, teacher_top: dict | None = None):
    """The OPD batch of a scored rollout. teacher_lp (N, T): log π_T of every sampled token;
    teacher_full: row -> (T, V) teacher distribution, for the kept rows; or, from another rank,
    teacher_top: row -> (T, k) the teacher's top-k token ids (the overlap needs no more; the
    symmetric KL is then not measured). Returns (PGBatch, stats); stats gain top-k overlap
    (and symmetric KL) once the batch's backward has run: they need the student's distribution,
    taken from that same forward."""
    delta = (teacher_lp - rollout.logprobs) * rollout.mask
    stats = {"opd_delta": float(delta.sum() / rollout.mask.sum()),   # ≈ −KL(π_θ‖π_T) per token
             "opd_tokens": int(rollout.mask.sum())}
    metric_sums = {"overlap": 0.0, "sym_kl": 0.0, "n": 0.0}
    kept = teacher_full if teacher_top is None else teacher_top

    def record_metrics(logp_all, rows):
        idx = [i for i in range(rows.start, rows.stop) if i in kept]
        if not idx:
            return
        s = logp_all[[i - rows.start for i in idx]].detach()
        m = rollout.mask[idx]
        if teacher_top is None:
            t = torch.stack([teacher_full[i] for i in idx])
            metric_sums["overlap"] += float((topk_overlap(s, t, cfg.overlap_k) * m).sum())
            metric_sums["sym_kl"] += float((symmetric_kl(s, t) * m).sum())
        else:
            t = torch.stack([teacher_top[i] for i in idx])
            metric_sums["overlap"] += float((overlap_of_ids(s.topk(cfg.overlap_k, dim=-1).indices, t) * m).sum())
        metric_sums["n"] += float(m.sum())
        stats["overlap"] = metric_sums["overlap"] / metric_sums["n"]
        if teacher_top is None:
            stats["sym_kl"] = metric_sums["sym_kl"] / metric_sums["n"]

    if cfg.loss == "sampled":
        surrogate = surrogate_loss(rollout, opd_advantages(rollout.logprobs, teacher_lp, cfg.beta), rl)

        def token_loss(logp_all, rows):
            record_metrics(logp_all, rows)
            return surrogate(logp_all, rows)
    elif cfg.loss in ("full", "topk"):
        if teacher_top is not None:
            raise ValueError(f"the {cfg.loss} OPD loss needs the teacher's full distribution")

        def token_loss(logp_all, rows):
            record_metrics(logp_all, rows)
            t = torch.stack([teacher_full[i] for i in range(rows.start, rows.stop)])
            if cfg.loss == "full":
                return cfg.beta * reverse_kl_full(logp_all, t)
            return cfg.beta * reverse_kl_topk(logp_all, t, cfg.loss_topk)
    else:
        raise ValueError(f"unknown OPD loss '{cfg.loss}' (sampled, full or topk)")
    return PGBatch(rollout, token_loss), stats


def opd_batch(student, teachers: dict, proc, examples: list, rl: RLConfig, cfg: OPDConfig):
    """Student rollouts on `examples`, each graded by teachers[example.domain]: (PGBatch, stats)."""
    missing = {ex.domain for ex in examples} - set(teachers)
    if missing:
        raise ValueError(f"no teacher for domain(s) {sorted(missing)}")
    rollout, domains = opd_rollout(student, proc, examples, rl, cfg)
    teacher_lp, teacher_full = teacher_logprobs(teachers, proc, rollout, domains, rl, rows_to_keep(cfg, rollout))
    return opd_loss(rollout, teacher_lp, teacher_full, rl, cfg)


@torch.no_grad()
def divergence(student, teacher, proc, examples: list, rl: RLConfig, k: int = 10, samples: int = 2):
    """Top-k overlap and symmetric KL of two policies over the student's own rollouts."""
    prompts = [prompt_of(proc, ex) for ex in examples]
    rollout = generate(student, proc, prompts, samples, rl.sampling)
    s = sampling_logprobs(response_logits(student, proc, rollout.prompts, rollout.response), rl.sampling, proc)
    t = sampling_logprobs(response_logits(teacher, proc, rollout.prompts, rollout.response), rl.sampling, proc)
    m, total = rollout.mask, rollout.mask.sum()
    return {"overlap": float((topk_overlap(s, t, k) * m).sum() / total),
            "sym_kl": float((symmetric_kl(s, t) * m).sum() / total)}
