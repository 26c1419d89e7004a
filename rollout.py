"""
Rollouts: our own batched sampler with a KV cache, and the teacher-forced scorer the trainer
uses. Both turn logits into log-probabilities through the same `sampling_logprobs`, so the
sampler's π_old(y_t | x, y_<t) equals a teacher-forced forward of the same weights (tested).

Sampling G responses for each of B prompts:
  1. left-pad the B prompts, one prefill (the vision tower and the prompt run once per prompt);
  2. repeat the prompt's KV cache G times;
  3. one decode step per token for all B·G rows, each row stopping at its own EOS, until every
     row is done or max_new_tokens.
The response mask covers every token up to and including the first EOS; it is built from
positions, never from token ids (pad may equal EOS).
"""

from dataclasses import dataclass

import torch

from policy import collate, forward, new_cache, position_ids


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16


@dataclass
class Rollout:
    prompts: list                 # the Prompts, each repeated G times (rows line up with response)
    response: torch.Tensor        # (N, T) token ids; after EOS: pad
    logprobs: torch.Tensor        # (N, T) log π_old of each sampled token
    mask: torch.Tensor            # (N, T) 1.0 up to and including the first EOS
    texts: list                   # decoded responses
    group_size: int


def sampling_logprobs(logits, cfg: SamplingConfig, proc):
    """log π(·|s) as sampled: ids past the tokenizer and the image/video placeholders masked
    (a placeholder in a response would break the next forward), temperature, then top-p (the
    nucleus renormalised). Trainer and sampler both call this."""
    logits = logits.float().clone()
    logits[..., proc.vocab_size:] = float("-inf")
    logits[..., [i for i in (proc.image_id, proc.video_id) if 0 <= i < logits.shape[-1]]] = float("-inf")
    logits = logits / max(cfg.temperature, 1e-5)
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs > cfg.top_p     # keep the smallest prefix with mass >= p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.log_softmax(-1)


def response_mask(response, eos_ids):
    """1 for every position up to and including the first EOS of each row."""
    is_eos = torch.isin(response, torch.tensor(eos_ids, device=response.device))
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()    # EOS strictly before t
    return (eos_before == 0).float()


def decode_step(model, token, attention_mask, positions, cache):
    """One token for every row. Kept small so the GPU path can capture it in a graph."""
    logits, cache = forward(model, token, attention_mask, positions, cache=cache)
    return logits[:, -1], cache


@torch.no_grad()
def generate(model, proc, prompts: list, group_size: int = 1, cfg: SamplingConfig = SamplingConfig(),
             greedy: bool = False) -> Rollout:
    device = next(model.parameters()).device
    batch = collate(prompts, proc.pad_id).to(device)
    pos = position_ids(model, batch.input_ids, batch.attention_mask, batch.vision)
    cache = new_cache(model)
    logits, cache = forward(model, batch.input_ids, batch.attention_mask, pos, cache=cache,
                            vision=batch.vision, logits_to_keep=1)
    logits = logits[:, -1]
    next_pos = pos.max(-1).values + 1                     # (B,) or (3, B) for M-RoPE
    G = group_size
    if G > 1:
        cache.batch_repeat_interleave(G)
        logits = logits.repeat_interleave(G, 0)
        next_pos = next_pos.repeat_interleave(G, -1)
    mask = batch.attention_mask.repeat_interleave(G, 0)
    N = logits.shape[0]
    eos = torch.tensor(proc.eos_ids, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    tokens, logps = [], []
    for _ in range(cfg.max_new_tokens):
        logp = sampling_logprobs(logits, cfg, proc)
        if greedy:
            tok = logp.argmax(-1)
        else:  # exponential race: argmax p/E with E ~ Exp(1) is a sample from p
            tok = (logp.exp() / torch.empty_like(logp).exponential_(1)).argmax(-1)
        tok = tok.masked_fill(done, proc.pad_id)
        tokens.append(tok)
        logps.append(logp.gather(-1, tok[:, None])[:, 0])
        done |= torch.isin(tok, eos)
        if bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(N, 1)], dim=1)
        step_pos = next_pos[..., None]
        logits, cache = decode_step(model, tok[:, None], mask, step_pos, cache)
        next_pos = next_pos + 1
    response = torch.stack(tokens, 1)
    rmask = response_mask(response, proc.eos_ids)
    logprobs = torch.stack(logps, 1) * rmask
    texts = proc.tokenizer.batch_decode(response * rmask.long() + proc.pad_id * (1 - rmask.long()),
                                        skip_special_tokens=True)
    return Rollout([p for p in prompts for _ in range(G)], response, logprobs, rmask, texts, G)


def response_logits(model, proc, prompts: list, response):
    """Teacher-forced logits at every response position: (N, T, V). One forward over
    prompt + response; only the response's logits go through the LM head."""
    batch = collate(prompts, proc.pad_id).to(response.device)
    T = response.shape[1]
    ids = torch.cat([batch.input_ids, response], dim=1)
    mask = torch.cat([batch.attention_mask, torch.ones_like(response)], dim=1)
    pos = position_ids(model, ids, mask, batch.vision)
    logits, _ = forward(model, ids, mask, pos, vision=batch.vision, logits_to_keep=T + 1)
    return logits[:, :-1]


def token_logprobs(logp_all, response):
    """Gather log π(y_t|·) from full log-probabilities (N, T, V)."""
    return logp_all.gather(-1, response[..., None])[..., 0]
