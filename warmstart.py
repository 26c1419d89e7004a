"""
The base policy π_0 for built-in runs: the random-init tiny Qwen2.5-VL after a short supervised
pass on the built-in tasks of every domain, so it is partly right (neither 0% nor 100%) and RL
has both successes and failures to learn from. Cached on disk in HF format and reused: every
method of every run with the same settings starts from the same π_0.
"""

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from policy import TinyConfig, build_tiny_policy, build_tokenizer, encode_prompt, load_policy, make_processor, save_policy
from rollout import response_logits
from run import cosine
from tasks import DOMAINS, builtin_examples


@dataclass
class WarmStartConfig:
    steps: int = 500
    batch_size: int = 48           # an equal share of every domain
    lr: float = 3e-3
    difficulty: int = 2
    train_examples: int = 4000     # per domain


def cache_dir():
    return os.environ.get("COPD_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache"))


def sft_loss(model, proc, examples):
    """Cross-entropy of the target answer (and its EOS) given the prompt."""
    prompts = [encode_prompt(proc, ex.prompt, ex.image, ex.video) for ex in examples]
    eos = proc.eos_ids[0]
    targets = [proc.tokenizer(ex.target(), add_special_tokens=False)["input_ids"] + [eos] for ex in examples]
    T = max(map(len, targets))
    device = next(model.parameters()).device
    response = torch.full((len(targets), T), proc.pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(targets), T, device=device)
    for i, t in enumerate(targets):
        response[i, :len(t)] = torch.tensor(t)
        mask[i, :len(t)] = 1
    logits = response_logits(model, proc, prompts, response)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), response.flatten(), reduction="none")
    return (nll * mask.flatten()).sum() / mask.sum()


def warm_start(tiny: TinyConfig, cfg: WarmStartConfig, seed: int, quiet: bool = False, device="cpu"):
    """π_0 (model, processor) on `device`: loaded from the cache, or trained (there) and cached."""
    key = hashlib.sha1(json.dumps([asdict(tiny), asdict(cfg), seed], sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir(), f"pi0-{key}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return load_policy(path, device=device)
    tokenizer = build_tokenizer()
    model = build_tiny_policy(tokenizer, tiny, seed).to(device)
    proc = make_processor(tokenizer, model)
    data = {d: builtin_examples(d, "train", cfg.train_examples, seed, cfg.difficulty) for d in DOMAINS}
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    # linear warm-up, then cosine down to 10%: π_0 ends settled, not mid-oscillation
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * cosine(s / cfg.steps, 0.1))
    model.train()
    started = time.time()
    bar = tqdm(range(cfg.steps), desc="warm start (SFT for π_0)", disable=True if quiet else None, leave=False)
    for _ in bar:
        batch = [ex for d in DOMAINS for ex in rng.sample(data[d], cfg.batch_size // len(DOMAINS))]
        loss = sft_loss(model, proc, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    # written beside the cache and renamed when complete: a killed run leaves no half π_0
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir(), prefix=".tmp-")
    save_policy(model, proc, tmp)
    try:
        os.replace(tmp, path)
    except OSError:  # another run finished the same π_0 first
        shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        print(f"π_0: warm start, {cfg.steps} supervised steps, {time.time() - started:.0f} s; cached in {path}", flush=True)
    return load_policy(path, device=device)
