"""
RLVR with GRPO (the paper's Phase I, Eq. 7): sample G responses per prompt from π_old, reward
them with the domain's verifier, normalise rewards within each group, and take ONE clipped
policy-gradient step per rollout batch. No KL term by default (CoPD's runs use none).

The pieces: `group_advantages`, `clipped_surrogate` and `k3_kl` (the equations, tensor in,
tensor out), `loss_weights` (how token losses are averaged), `PGBatch` and `update` (one
optimizer step on one or more batches in micro-batches, shared with OPD and CoPD, which bring
token advantages of their own), `grpo_batch` (sample + reward + advantages) and `rlvr_step`.

Shapes: N rows (prompts × G), L response positions, V the vocabulary.
"""

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from policy import prompt_of
from rollout import Rollout, SamplingConfig, generate, response_logprobs, token_logprobs
from verifiers import score


@dataclass
class RLConfig:
    prompts_per_step: int = 16
    group_size: int = 8                 # G
    eps_low: float = 0.2                # ε_low
    eps_high: float = 0.28              # ε_high (clip-higher)
    advantage: str = "grpo"             # "grpo" | "dr_grpo" (no division by the std)
    loss_agg: str = "token"             # "token" | "seq" (the paper's) | "seq_len_max" (Dr. GRPO)
    kl_coef: float = 0.0                # β_KL toward π_ref (k3); 0 as in the paper
    micro_batch: int = 64               # rows per forward/backward; the step is still one update
    max_grad_norm: float = 1.0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


# -----------------------------------------------------------------------------
# the equations

def group_advantages(rewards, kind: str = "grpo"):
    """Â_i = (r_i − mean(r)) / (std(r) + 1e-6) over the G responses to one prompt;
    `dr_grpo`: Â_i = r_i − mean(r). rewards (B, G) -> (B, G)."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    if kind == "dr_grpo":
        return centred
    if kind != "grpo":
        raise ValueError(f"unknown advantage '{kind}' (grpo or dr_grpo)")
    return centred / (rewards.std(-1, keepdim=True) + 1e-6)


def clipped_surrogate(logp, old_logp, advantages, eps_low: float, eps_high: float):
    """ℓ_{i,t} = −min(ρ_{i,t} Â_{i,t}, clip(ρ_{i,t}, 1−ε_low, 1+ε_high) Â_{i,t}),
    ρ_{i,t} = π_θ(y_{i,t} | x, y_{i,<t}) / π_old(y_{i,t} | x, y_{i,<t}).
    All (N, L); Â is a constant (detached). Returns (ℓ, where the clip is active)."""
    advantages = advantages.detach()
    ratio = torch.exp(logp - old_logp.detach())
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def k3_kl(logp, ref_logp):
    """k3 = π_ref/π_θ − log(π_ref/π_θ) − 1 per token, an unbiased estimate of KL(π_θ‖π_ref).
    Used directly as a loss on samples of π_θ, its gradient is that of the forward
    KL(π_ref‖π_θ), not of the reverse KL it estimates; the paper's CoPD runs use no KL at all."""
    log_ratio = ref_logp.detach() - logp
    return torch.exp(log_ratio) - log_ratio - 1


def loss_weights(masks: list, agg: str = "token", max_len: int | None = None):
    """Weights w_{i,t} with L = Σ w·ℓ, normalised over ALL the batches of one update (so
    micro-batching and CoPD's combined batches do not change the loss):
      token       : 1 / Σ|y_i|                   (the default; no length bias)
      seq         : 1 / (N·|y_i|)                (the paper's −1/G Σ_i 1/|y_i| Σ_t)
      seq_len_max : 1 / (N·L_max)                (Dr. GRPO)"""
    n_rows = sum(m.shape[0] for m in masks)
    if agg == "token":
        total = sum(m.sum() for m in masks).clamp(min=1)
        return [m / total for m in masks]
    if agg == "seq":
        return [m / m.sum(-1, keepdim=True).clamp(min=1) / n_rows for m in masks]
    if agg == "seq_len_max":
        return [m / (n_rows * (max_len or m.shape[1])) for m in masks]
    raise ValueError(f"unknown loss aggregation '{agg}' (token, seq or seq_len_max)")


# -----------------------------------------------------------------------------
# one update on one or more batches, shared by RLVR, OPD and CoPD

@dataclass
class PGBatch:
    """One rollout and what each of its tokens is trained toward."""
    rollout: Rollout
    advantages: torch.Tensor | None          # (N, L) Â_{i,t}, constants, 0 past each response
    ref_logp: torch.Tensor | None = None     # (N, L) log π_ref(y_t), for the optional k3 term
    exact_loss: Callable | None = None       # OPD's full / top-k reverse KL instead of the surrogate:
                                             # (logp_all (n, L, V), rows slice) -> ℓ (n, L)


def token_loss(batch: PGBatch, logp_all, rows: slice, cfg: RLConfig):
    """ℓ_{i,t} of the rows `rows` of `batch`, given the current policy's log π(·|s_t), logp_all
    (n, L, V). Returns (ℓ (n, L), where the clip is active (n, L), or None for an exact loss)."""
    if batch.exact_loss is not None:
        return batch.exact_loss(logp_all, rows), None
    r = batch.rollout
    mask = r.mask[rows]
    logp = torch.where(mask > 0, token_logprobs(logp_all, r.response[rows]), 0.0)
    loss, clipped = clipped_surrogate(logp, r.logprobs[rows], batch.advantages[rows], cfg.eps_low, cfg.eps_high)
    if batch.ref_logp is not None and cfg.kl_coef > 0:
        loss = loss + cfg.kl_coef * k3_kl(logp, batch.ref_logp[rows])
    return loss, clipped


def backward_tokens(model, proc, batch: PGBatch, weights, cfg: RLConfig, measure_rows=()) -> tuple:
    """Teacher-forced forward of the batch in micro-batches and backward of Σ w·ℓ. Returns
    (the summed loss, what it measured on the way: {"clip_frac"} for a surrogate batch, and
    {"student": {row: log π_θ(·|s_t) (L, V)}} for each row in `measure_rows`, detached)."""
    total, seen = 0.0, {}
    r = batch.rollout
    N = r.response.shape[0]
    for start in range(0, N, cfg.micro_batch):
        rows = slice(start, min(N, start + cfg.micro_batch))
        logp_all = response_logprobs(model, proc, r.prompts[rows], r.response[rows], cfg.sampling)
        loss_tokens, clipped = token_loss(batch, logp_all, rows, cfg)
        loss = (loss_tokens * weights[rows]).sum()
        loss.backward()
        total += loss.item()
        if clipped is not None:
            seen["clip_frac"] = seen.get("clip_frac", 0.0) + float((clipped * r.mask[rows]).sum() / r.mask.sum())
        measured = [i for i in range(rows.start, rows.stop) if i in measure_rows]
        if measured:
            seen.setdefault("student", {}).update({i: logp_all[i - start].detach() for i in measured})
    return total, seen


def update(model, optimizer, proc, batches: list, cfg: RLConfig, sync_grads=None, measure_rows=None) -> tuple:
    """ONE optimizer step on the weighted sum of every batch's token losses. A non-finite
    loss or gradient skips the step (the caller decides when to give up). `sync_grads(model)`
    runs between backward and step (data-parallel replicas average their gradients there).
    `measure_rows`: {batch index: rows whose student distribution the caller measures}.
    Returns ({"loss", "grad_norm", "skipped"}, [what backward_tokens measured, per batch])."""
    weights = loss_weights([b.rollout.mask for b in batches], cfg.loss_agg, cfg.sampling.max_new_tokens)
    optimizer.zero_grad(set_to_none=True)
    model.train()
    loss, seen = 0, []
    for i, (b, w) in enumerate(zip(batches, weights)):
        part, measured = backward_tokens(model, proc, b, w, cfg, (measure_rows or {}).get(i, ()))
        loss += part
        seen.append(measured)
    model.eval()
    if sync_grads is not None:
        sync_grads(model)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm).item()
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "grad_norm": grad_norm, "skipped": not finite}, seen


# -----------------------------------------------------------------------------
# GRPO

def grpo_batch(model, proc, examples: list, cfg: RLConfig, ref_model=None):
    """Sample G responses per prompt, reward them, Â_i broadcast over tokens (Eq. 7).
    Returns (PGBatch, stats)."""
    prompts = [prompt_of(proc, ex) for ex in examples]
    rollout = generate(model, proc, prompts, cfg.group_size, cfg.sampling)
    rewards, correct = score(rollout.texts, examples, cfg.group_size)
    groups = rewards.view(len(examples), cfg.group_size)
    adv = group_advantages(groups, cfg.advantage).view(-1, 1).to(rollout.mask.device) * rollout.mask
    ref_logp = None
    if ref_model is not None and cfg.kl_coef > 0:
        with torch.no_grad():
            ref_logp = token_logprobs(response_logprobs(ref_model, proc, rollout.prompts, rollout.response, cfg.sampling),
                                      rollout.response)
    stats = {
        "reward": rewards.mean().item(), "train_acc": correct.mean().item(),
        "response_len": rollout.mask.sum(-1).mean().item(),
        "zero_signal_frac": (groups.std(-1) < 1e-6).float().mean().item(),
        "tokens": int(rollout.mask.sum()),
    }
    return PGBatch(rollout, adv, ref_logp), stats


def rlvr_step(model, optimizer, proc, examples: list, cfg: RLConfig, ref_model=None) -> dict:
    """One GRPO step: one rollout batch, one update."""
    batch, stats = grpo_batch(model, proc, examples, cfg, ref_model)
    result, (seen,) = update(model, optimizer, proc, [batch], cfg)
    stats.update(seen)
    stats.update(result)
    return stats


def grad_cosine(model, proc, examples: dict, cfg: RLConfig) -> dict:
    """cos(∇L_a, ∇L_b) between two domains' GRPO losses on the same weights, for every pair of
    {domain: prompts}: the gradient conflict the paper argues but never measures."""
    grads = {}
    for d, exs in examples.items():
        batch, _ = grpo_batch(model, proc, exs, cfg)
        model.zero_grad(set_to_none=True)
        w = loss_weights([batch.rollout.mask], cfg.loss_agg)[0]
        backward_tokens(model, proc, batch, w, cfg)
        grads[d] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                              for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    return {f"{a}~{b}": round(float(torch.nn.functional.cosine_similarity(grads[a], grads[b], dim=0)), 4)
            for a in grads for b in grads if a < b}
