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

import copy
import itertools
import sys
import weakref
from dataclasses import dataclass

import torch

from policy import collate, core, forward, new_cache, position_ids, prompt_positions


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    cuda_graph: bool = True       # on CUDA: static KV cache, decode step replayed as a CUDA graph
    done_check_every: int = 8     # GPU path: one host sync per this many tokens, not per token


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


@dataclass
class Prefill:
    """The prompts' forward, which decoding starts from."""
    batch: object                 # the left-padded PromptBatch
    pos: torch.Tensor             # its positions: (B, L), or (3, B, L) for M-RoPE
    cache: object                 # its KV cache
    logits: torch.Tensor          # (B, V) for the first response token


@torch.no_grad()
def prefill(model, proc, prompts: list) -> Prefill:
    """Left-pad the prompts, run them (their images and videos) once. `evaluate.accuracy` shares one
    prefill between greedy and sampled decoding: for pictures the prefill is most of the cost."""
    device = next(model.parameters()).device
    batch = collate(prompts, proc.pad_id).to(device)
    pos = prompt_positions(model, prompts, batch)
    logits, cache = forward(model, batch.input_ids, batch.attention_mask, pos, cache=new_cache(model),
                            vision=batch.vision, logits_to_keep=1)
    return Prefill(batch, pos, cache, logits[:, -1])


@torch.no_grad()
def generate(model, proc, prompts: list, group_size: int = 1, cfg: SamplingConfig = SamplingConfig(),
             greedy: bool = False, prefilled: Prefill | None = None) -> Rollout:
    """G responses for each prompt. `prefilled`: the prompts' `prefill`, left as it was (decoding
    works on a copy of its cache), so another call can start from it too."""
    device = next(model.parameters()).device
    if device.type == "cuda" and cfg.cuda_graph:
        return generate_static(model, proc, prompts, group_size, cfg, greedy, capture=True, prefilled=prefilled)
    state = prefilled or prefill(model, proc, prompts)
    cache = copy.deepcopy(state.cache) if prefilled else state.cache
    batch, logits = state.batch, state.logits
    next_pos = state.pos.max(-1).values + 1               # (B,) or (3, B) for M-RoPE
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
    return finish(proc, prompts, G, torch.stack(tokens, 1), torch.stack(logps, 1))


def finish(proc, prompts, G, response, logprobs) -> Rollout:
    rmask = response_mask(response, proc.eos_ids)
    response = response.masked_fill(rmask == 0, proc.pad_id)
    texts = proc.tokenizer.batch_decode(response, skip_special_tokens=True)
    return Rollout([p for p in prompts for _ in range(G)], response, logprobs * rmask, rmask, texts, G)


# -----------------------------------------------------------------------------
# the GPU path: a static KV cache sized once per (rows, length) bucket and the decode step,
# sampling included, replayed as one CUDA graph: no Python, no host sync per token

_STATIC = {}   # (model, rows, cache length, sampling, greedy) -> buffers, cache, graph


def _race(logp, greedy: bool):
    if greedy:
        return logp.argmax(-1)
    return (logp.exp() / torch.empty_like(logp).exponential_(1)).argmax(-1)


def _static_step(model, proc, cfg, greedy, s):
    """Decode one token for every row from the state buffers `s`, all in place."""
    col = s["prompt_len"] + s["t"]                                   # this token's cache slot
    s["mask"].scatter_(1, col.expand(s["mask"].shape[0], 1), 1.0)
    additive = (1.0 - s["mask"][:, None, None, :]) * torch.finfo(s["mask"].dtype).min
    logits, _ = forward(model, s["token"], additive, s["pos"], cache=s["cache"])
    logp = sampling_logprobs(logits[:, -1], cfg, proc)
    tok = _race(logp, greedy).masked_fill(s["done"], proc.pad_id)
    nxt = (s["t"] + 1).expand(tok.shape[0], 1)
    s["tokens"].scatter_(1, nxt, tok[:, None])
    s["logps"].scatter_(1, nxt, logp.gather(-1, tok[:, None]))
    s["done"] |= torch.isin(tok, s["eos"])
    s["token"].copy_(tok[:, None])
    s["pos"].add_(1)
    s["t"].add_(1)


@torch.no_grad()
def generate_static(model, proc, prompts: list, group_size: int = 1, cfg: SamplingConfig = SamplingConfig(),
                    greedy: bool = False, capture: bool = True, prefilled: Prefill | None = None) -> Rollout:
    """Same contract as `generate`. Prefill runs eagerly (dynamic cache), its KV is repeated
    into a static cache, then `_static_step` runs max_new_tokens − 1 times, as a CUDA graph
    when `capture` (the CPU runs it eagerly: that is how the tests check it)."""
    from transformers import StaticCache
    device = next(model.parameters()).device
    state = prefilled or prefill(model, proc, prompts)
    batch, pos, logits = state.batch, state.pos, state.logits[:, None]
    G, (B, Lp), T = group_size, batch.input_ids.shape, cfg.max_new_tokens
    N, L = B * G, -(-(Lp + T) // 64) * 64                             # length bucket: multiple of 64
    key = (id(model), N, L, cfg.temperature, cfg.top_p, greedy, device)
    if key in _STATIC and _STATIC[key]["owner"]() is not model:   # a freed model's id, reused
        del _STATIC[key]
    if key not in _STATIC:
        dtype = next(model.parameters()).dtype
        _STATIC[key] = {
            "cache": StaticCache(config=model.config, max_cache_len=L),
            "mask": torch.zeros(N, L, dtype=dtype, device=device),
            "token": torch.zeros(N, 1, dtype=torch.long, device=device),
            "pos": torch.zeros((3, N, 1) if pos.dim() == 3 else (N, 1), dtype=torch.long, device=device),
            "tokens": torch.zeros(N, T + 1, dtype=torch.long, device=device),
            "logps": torch.zeros(N, T + 1, device=device),
            "done": torch.zeros(N, dtype=torch.bool, device=device),
            "eos": torch.tensor(proc.eos_ids, device=device),
            "t": torch.zeros((), dtype=torch.long, device=device),
            "prompt_len": torch.zeros((), dtype=torch.long, device=device),
            "graph": None,
            "owner": weakref.ref(model),   # the graph holds its weights' addresses
        }
    s = _STATIC[key]

    def reset():
        s["cache"].reset()
        for layer, (k, v) in zip(s["cache"].layers, _layer_kv(state.cache)):
            layer.update(k.repeat_interleave(G, 0), v.repeat_interleave(G, 0))
        s["mask"].zero_()
        s["mask"][:, :Lp] = batch.attention_mask.repeat_interleave(G, 0)
        s["prompt_len"].fill_(Lp)
        s["t"].zero_()
        s["pos"].copy_((pos.max(-1).values + 1).repeat_interleave(G, -1)[..., None])
        logp = sampling_logprobs(logits[:, -1].repeat_interleave(G, 0), cfg, proc)   # the first token
        tok = _race(logp, greedy)
        s["tokens"].zero_()
        s["logps"].zero_()
        s["tokens"][:, 0] = tok
        s["logps"][:, 0] = logp.gather(-1, tok[:, None])[:, 0]
        s["done"].copy_(torch.isin(tok, s["eos"]))
        s["token"].copy_(tok[:, None])

    if capture and not _GRAPH_FAILURES:
        try:
            if s["graph"] is None:
                s["graph"] = _capture(model, proc, cfg, greedy, s, reset)
            reset()
            _decode(s, T, cfg, s["graph"].replay)
            return finish(proc, prompts, G, s["tokens"][:, :T].clone(), s["logps"][:, :T].clone())
        except Exception as e:   # capture or replay failed: decode with the same step, eagerly
            _graph_failed(e)
            s["graph"] = None
    reset()
    _decode(s, T, cfg, lambda: _static_step(model, proc, cfg, greedy, s))
    return finish(proc, prompts, G, s["tokens"][:, :T].clone(), s["logps"][:, :T].clone())


def _capture(model, proc, cfg, greedy, s, reset):
    """The decode step as a CUDA graph, after two warm-up steps on a side stream."""
    reset()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _static_step(model, proc, cfg, greedy, s)
    torch.cuda.current_stream().wait_stream(side)
    reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _static_step(model, proc, cfg, greedy, s)
    return graph


def _decode(s, T: int, cfg: SamplingConfig, step):
    """Tokens 2..T: `step` (a graph replay or the eager step) until every row is done."""
    for i in range(1, T):
        step()
        if i % cfg.done_check_every == 0 and bool(s["done"].all()):   # the only host sync
            break


_GRAPH_FAILURES = []   # the first failure's message: once there is one, every later call decodes eagerly


def _graph_failed(error: Exception):
    """Warn once. The message is kept, not the exception: its traceback would pin the frames
    that hold the static buffers."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    print(f"warning: CUDA graph decoding failed ({first}); sampling with the static cache, eagerly, "
          "from now on", file=sys.stderr, flush=True)
    _GRAPH_FAILURES.append(first)


def _layer_kv(cache):
    """(keys, values) of every layer of a filled DynamicCache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def response_logits(model, proc, prompts: list, response):
    """Teacher-forced logits at every response position: (N, T, V), differentiable.
    Consecutive rows that share a prompt (the G samples of one prompt: the same Prompt object)
    share its prefill, as in the sampler: the prompt and its image or video run once, the KV
    cache is repeated for each row, then one forward over the response tokens. Compute then
    grows with B·prompt + N·response tokens instead of N·(prompt + response); the prompt's
    gradient sums over its rows through the repeated cache."""
    counts = _runs(prompts)
    if len(counts) == len(prompts) or _checkpointing(model):
        return full_response_logits(model, proc, prompts, response)   # nothing shared (or no cache)
    starts = [0] + list(itertools.accumulate(counts))[:-1]
    firsts = [prompts[i] for i in starts]
    batch = collate(firsts, proc.pad_id).to(response.device)
    reps = torch.tensor(counts, device=response.device)
    pos = prompt_positions(model, firsts, batch)
    logits, cache = forward(model, batch.input_ids, batch.attention_mask, pos, cache=new_cache(model),
                            vision=batch.vision, logits_to_keep=1)
    first = logits[:, -1:].repeat_interleave(reps, 0)                    # predicts response[:, 0]
    T = response.shape[1]
    if T == 1:
        return first
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.repeat_interleave(reps, 0), layer.values.repeat_interleave(reps, 0)
    mask = torch.cat([batch.attention_mask.repeat_interleave(reps, 0),
                      torch.ones_like(response[:, :-1], dtype=batch.attention_mask.dtype)], dim=1)
    start = (pos.max(-1).values + 1).repeat_interleave(reps, -1)           # (N,) or (3, N) for M-RoPE
    steps = start[..., None] + torch.arange(T - 1, device=response.device)
    rest, _ = forward(model, response[:, :-1], mask, steps, cache=cache)
    return torch.cat([first, rest], dim=1)


def response_logprobs(model, proc, prompts: list, response, cfg: SamplingConfig):
    """Teacher-forced log π(·|x, y_<t) at every response position, as sampled: (N, L, V).
    The one scorer of the trainer (differentiable), the teachers and the probes (under no_grad)."""
    return sampling_logprobs(response_logits(model, proc, prompts, response), cfg, proc)


def full_response_logits(model, proc, prompts: list, response, positions=None):
    """The same logits from one forward over prompt + response for every row (the reference
    the shared-prefill path is tested against; the warm start's rows never share a prompt, and
    it brings their `positions`, computed once per example)."""
    batch = collate(prompts, proc.pad_id).to(response.device)
    T = response.shape[1]
    ids = torch.cat([batch.input_ids, response], dim=1)
    mask = torch.cat([batch.attention_mask, torch.ones_like(response)], dim=1)
    pos = positions if positions is not None else position_ids(model, ids, mask, batch.vision)
    logits, _ = forward(model, ids, mask, pos, vision=batch.vision, logits_to_keep=T + 1)
    return logits[:, :-1]


def _checkpointing(model) -> bool:
    """Activation checkpointing is on (transformers runs it without a cache): renamed in 5.2x."""
    m = core(model)
    name = "is_activation_checkpointing" if hasattr(type(m), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(m, name, False))


def _runs(prompts: list) -> list:
    """Lengths of the runs of one same prompt object: [3, 3] for two prompts sampled 3 times."""
    counts = []
    for i, p in enumerate(prompts):
        if i and p is prompts[i - 1]:
            counts[-1] += 1
        else:
            counts.append(1)
    return counts


def token_logprobs(logp_all, response):
    """Gather log π(y_t|·) from full log-probabilities (N, T, V)."""
    return logp_all.gather(-1, response[..., None])[..., 0]
