"""
RLVR with GRPO (the paper's Phase I, Eq. 7): sample G responses per prompt from π_old, reward
them with the domain's verifier, normalise rewards within each group, and take ONE clipped
policy-gradient step per rollout batch. No KL term by default (CoPD's runs use none).

The pieces: `group_advantages` and `clipped_surrogate` (the equations), `loss_weights` (how
token losses are averaged), `backward_tokens` (teacher-forced forward + backward in micro-
batches, shared with OPD and CoPD, which bring token advantages of their own), `grpo_batch`
(sample + reward + advantages) and `rlvr_step` (one update).
"""

import math
from dataclasses import dataclass, field

import torch

from policy import prompt_of
from rollout import SamplingConfig, generate, response_logits, sampling_logprobs, token_logprobs
from verifiers import grade


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
    All (N, T); Â is a constant (detached). Returns (ℓ, where the clip is active)."""
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
# forward + backward, shared by RLVR, OPD and CoPD

def backward_tokens(model, proc, rollout, weights, cfg: RLConfig, token_loss):
    """Teacher-forced forward of the rollout in micro-batches and backward of Σ w·ℓ.
    token_loss(logp_all, rows) -> (ℓ (n, T), stats dict) where logp_all (n, T, V) is the
    current policy's sampling distribution at each response position. Returns summed loss."""
    total = 0.0
    N = rollout.response.shape[0]
    for start in range(0, N, cfg.micro_batch):
        rows = slice(start, min(N, start + cfg.micro_batch))
        logits = response_logits(model, proc, rollout.prompts[rows], rollout.response[rows])
        logp_all = sampling_logprobs(logits, cfg.sampling, proc)
        loss_tokens = token_loss(logp_all, rows)
        loss = (loss_tokens * weights[rows]).sum()
        loss.backward()
        total += loss.item()
    return total


@dataclass
class PGBatch:
    """One rollout and the per-token loss it contributes to an update."""
    rollout: object
    token_loss: object        # (logp_all (n, T, V), rows slice) -> ℓ (n, T)


def update(model, optimizer, proc, batches: list, cfg: RLConfig, sync_grads=None) -> dict:
    """ONE optimizer step on the weighted sum of every batch's token losses. A non-finite
    loss or gradient skips the step (the caller decides when to give up). `sync_grads(model)`
    runs between backward and step (data-parallel replicas average their gradients there)."""
    weights = loss_weights([b.rollout.mask for b in batches], cfg.loss_agg, cfg.sampling.max_new_tokens)
    optimizer.zero_grad(set_to_none=True)
    model.train()
    loss = sum(backward_tokens(model, proc, b.rollout, w, cfg, b.token_loss) for b, w in zip(batches, weights))
    model.eval()
    if sync_grads is not None:
        sync_grads(model)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm).item()
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "grad_norm": grad_norm, "skipped": not finite}


# -----------------------------------------------------------------------------
# GRPO

def score(texts: list, examples: list, group_size: int):
    """Rewards r_i and correctness for responses laid out as G per example."""
    rewards, correct = [], []
    for i, text in enumerate(texts):
        ex = examples[i // group_size]
        r, ok = grade(text, ex.answer, ex.verifier)
        rewards.append(r)
        correct.append(ok)
    return torch.tensor(rewards), torch.tensor(correct, dtype=torch.float)


def surrogate_loss(rollout, advantages, cfg: RLConfig, ref_logp=None, stats=None):
    """The clipped surrogate (+ optional k3 KL) as a token_loss for `update`; advantages (N, T)."""
    def token_loss(logp_all, rows):
        mask = rollout.mask[rows]
        logp = torch.where(mask > 0, token_logprobs(logp_all, rollout.response[rows]), 0.0)
        loss, clipped = clipped_surrogate(logp, rollout.logprobs[rows], advantages[rows],
                                          cfg.eps_low, cfg.eps_high)
        if ref_logp is not None and cfg.kl_coef > 0:
            loss = loss + cfg.kl_coef * k3_kl(logp, ref_logp[rows])
        if stats is not None:
            stats["clip_frac"] = stats.get("clip_frac", 0.0) + float((clipped * mask).sum() / rollout.mask.sum())
        return loss
    return token_loss


def grpo_batch(model, proc, examples: list, cfg: RLConfig, ref_model=None):
    """Sample G responses per prompt, reward, Â (broadcast over tokens). Returns (PGBatch, stats)."""
    prompts = [prompt_of(proc, ex) for ex in examples]
    rollout = generate(model, proc, prompts, cfg.group_size, cfg.sampling)
    rewards, correct = score(rollout.texts, examples, cfg.group_size)
    groups = rewards.view(len(examples), cfg.group_size)
    adv = group_advantages(groups, cfg.advantage).view(-1, 1).to(rollout.mask.device) * rollout.mask
    ref_logp = None
    if ref_model is not None and cfg.kl_coef > 0:
        with torch.no_grad():
            logits = response_logits(ref_model, proc, rollout.prompts, rollout.response)
            ref_logp = token_logprobs(sampling_logprobs(logits, cfg.sampling, proc), rollout.response)
    stats = {
        "reward": rewards.mean().item(), "train_acc": correct.mean().item(),
        "response_len": rollout.mask.sum(-1).mean().item(),
        "zero_signal_frac": (groups.std(-1) < 1e-6).float().mean().item(),
        "tokens": int(rollout.mask.sum()),
    }
    return PGBatch(rollout, surrogate_loss(rollout, adv, cfg, ref_logp, stats)), stats


def rlvr_step(model, optimizer, proc, examples: list, cfg: RLConfig, ref_model=None) -> dict:
    """One GRPO step: one rollout batch, one update."""
    batch, stats = grpo_batch(model, proc, examples, cfg, ref_model)
    stats.update(update(model, optimizer, proc, [batch], cfg))
    return stats


def grad_cosine(model, proc, examples: dict, cfg: RLConfig) -> dict:
    """cos(∇L_a, ∇L_b) between two domains' GRPO losses on the same weights, for every pair of
    {domain: prompts}: the gradient conflict the paper argues but never measures."""
    grads = {}
    for d, exs in examples.items():
        batch, _ = grpo_batch(model, proc, exs, cfg)
        model.zero_grad(set_to_none=True)
        w = loss_weights([batch.rollout.mask], cfg.loss_agg)[0]
        backward_tokens(model, proc, batch.rollout, w, cfg, batch.token_loss)
        grads[d] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                              for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    return {f"{a}~{b}": round(float(torch.nn.functional.cosine_similarity(grads[a], grads[b], dim=0)), 4)
            for a in grads for b in grads if a < b}
