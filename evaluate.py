"""
Held-out accuracy: how every method, π_0 and the probes are measured. A policy answers each
held-out problem greedily (the reported number) and, optionally, with `samples` sampled
responses (the mean over samples), both decoded from one prefill of the prompts.
"""

import torch

from policy import prompt_of
from rollout import SamplingConfig, generate, prefill
from verifiers import extract_answer, score


@torch.no_grad()
def accuracy(model, proc, examples: list, sampling: SamplingConfig, samples: int = 1, batch: int = 256) -> dict:
    """{"greedy": fraction right, "right": which problems greedy got right ("0110…", one digit
    per example: paired differences between models need it), "sampled": mean over `samples`
    responses (if samples > 0)}."""
    greedy, sampled = [], []
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        encoded = [prompt_of(proc, ex) for ex in chunk]
        state = prefill(model, proc, encoded) if samples else None
        greedy.append(score(generate(model, proc, encoded, 1, sampling, greedy=True, prefilled=state).texts, chunk, 1)[1])
        if samples:
            sampled.append(score(generate(model, proc, encoded, samples, sampling, prefilled=state).texts, chunk, samples)[1])
    right = torch.cat(greedy)
    out = {"greedy": float(right.mean()), "right": "".join("01"[int(r)] for r in right.tolist())}
    if samples:
        out["sampled"] = float(torch.cat(sampled).mean())
    return out


@torch.no_grad()
def learning_signal(model, proc, examples: list, sampling: SamplingConfig, k: int = 8, batch: int = 128) -> dict:
    """What GRPO can learn from a policy on `examples`, k samples each (a group): greedy accuracy;
    pass@k (any sample right: RL sharpens what sampling sometimes finds); the share of groups
    whose k rewards are all equal (all right or all wrong: zero advantage, no gradient); and the
    share answered with one and the same wrong answer every time (a systematic error, not noise)."""
    greedy, any_right, equal, systematic = [], [], [], []
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        encoded = [prompt_of(proc, ex) for ex in chunk]
        state = prefill(model, proc, encoded)
        greedy.append(score(generate(model, proc, encoded, 1, sampling, greedy=True, prefilled=state).texts, chunk, 1)[1])
        texts = generate(model, proc, encoded, k, sampling, prefilled=state).texts
        rewards, right = score(texts, chunk, k)
        rewards, right = rewards.view(-1, k), right.view(-1, k)
        any_right.append(right.max(1).values)
        equal.append((rewards == rewards[:, :1]).all(1).float())
        answers = [[extract_answer(t) for t in texts[j * k:(j + 1) * k]] for j in range(len(chunk))]
        systematic.append(torch.tensor([float(r.sum() == 0 and len(set(a)) == 1) for r, a in zip(right, answers)]))
    mean = lambda parts: float(torch.cat(parts).mean())
    return {"greedy": mean(greedy), f"pass@{k}": mean(any_right), "zero_advantage": mean(equal),
            "systematic": mean(systematic)}
