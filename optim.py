"""
The optimizer and the learning rate every loop uses (the warm start takes `cosine` too).

AdamW with β = (0.9, 0.99) and no weight decay; η_t decays along a cosine from the peak η at a
loop's first update to min_frac·η at its last. Why decay: at a constant η the tiny policy's
greedy answers keep flipping (held-out text accuracy moved by up to 16 points between evals 50
steps apart), and the last weights are the ones reported. `--lr-schedule constant` keeps η.
"""

import math

import torch


def cosine(progress: float, floor: float) -> float:
    """The factor floor + (1 − floor)·½(1 + cos(π·progress)): 1 at progress 0, `floor` at 1."""
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def learning_rate(peak: float, step: int, total: int, schedule: str = "cosine", min_frac: float = 0.1) -> float:
    """η_t of update t = 1..total: cosine, η at the first update and min_frac·η at the last; constant: η."""
    if schedule == "constant" or total <= 1:
        return peak
    return peak * cosine((step - 1) / (total - 1), min_frac)


def adamw(model, lr: float):
    """AdamW over the trainable parameters (with LoRA: the adapters)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)


def set_lr(optimizers, lr: float):
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
