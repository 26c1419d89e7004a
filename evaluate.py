"""
Held-out accuracy: how every method, π_0 and the probes are measured. A policy answers each
held-out problem greedily (the reported number) and, optionally, with `samples` sampled
responses (the mean over samples), both decoded from one prefill of the prompts.
"""

import torch

from policy import prompt_of
from rollout import SamplingConfig, generate, prefill
from verifiers import score


@torch.no_grad()
def accuracy(model, proc, examples: list, sampling: SamplingConfig, samples: int = 1, batch: int = 256) -> dict:
    """{"greedy": fraction right, "sampled": mean over `samples` responses (if samples > 0)}."""
    greedy, sampled = [], []
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        encoded = [prompt_of(proc, ex) for ex in chunk]
        state = prefill(model, proc, encoded) if samples else None
        greedy.append(score(generate(model, proc, encoded, 1, sampling, greedy=True, prefilled=state).texts, chunk, 1)[1])
        if samples:
            sampled.append(score(generate(model, proc, encoded, samples, sampling, prefilled=state).texts, chunk, samples)[1])
    out = {"greedy": float(torch.cat(greedy).mean())}
    if samples:
        out["sampled"] = float(torch.cat(sampled).mean())
    return out
