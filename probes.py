"""
Why CoPD's merge wins or loses: probes of the all-in-one model, run in every CoPD stage.

The paper merges the K branches by a plain average, θ = 1/K Σ_k θ^(k), and justifies it by the
branches staying close: a shared π_0 and continual mutual OPD. These measure whether they do,
and whether the average is where skill is lost:
- drift: ‖θ^(a) − θ^(b)‖ / ‖θ_0‖ for linked branches and ‖θ^(k) − θ_0‖ / ‖θ_0‖ for each
  (at every evaluation, beside the merged model's accuracy);
- the interpolation curve: accuracy at (1−α)·θ^(a) + α·θ^(b) for α in ALPHAS (at the end);
- the output ensemble: greedy decoding from 1/K Σ_k π^(k)(·|s), the branches' weights kept
  apart (at the end).
If the ensemble keeps the branches' skills and the average does not, the weights cannot be
averaged (the drift is to blame); if the ensemble loses them too, the branches disagree.
"""

import copy
import os

import torch

from evaluate import accuracy
from memory import folded
from policy import prompt_of
from rollout import SamplingConfig, decode_step, finish, prefill, sampling_logprobs
from verifiers import score

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in folded(model).parameters()])


def drift(models: dict, model0, pairs: list) -> dict:
    """{"a~b": ‖θ^(a) − θ^(b)‖ / ‖θ_0‖ for (a, b) in pairs, "k~base": ‖θ^(k) − θ_0‖ / ‖θ_0‖}:
    how far the branches {k: model} have moved, in units of π_0's own weight norm."""
    theta0 = _flat(model0)
    scale = float(theta0.norm())
    flat = {k: _flat(m) for k, m in models.items()}
    out = {f"{a}~{b}": round(float((flat[a] - flat[b]).norm()) / scale, 6) for a, b in pairs}
    out.update({f"{k}~base": round(float((f - theta0).norm()) / scale, 6) for k, f in flat.items()})
    return out


def interpolate(model_a, model_b, alpha: float):
    """A new model at (1−α)·θ^(a) + α·θ^(b) (LoRA branches folded first); α = 0.5 for two
    branches is the merge."""
    a, b = folded(model_a), folded(model_b)
    mixed = copy.deepcopy(a)
    with torch.no_grad():
        for p, pa, pb in zip(mixed.parameters(), a.parameters(), b.parameters()):
            p.copy_(((1 - alpha) * pa.double() + alpha * pb.double()).to(p.dtype))
    return mixed


def interpolation_curve(model_a, model_b, proc, heldout: dict, sampling: SamplingConfig, known: dict) -> list:
    """[[α, {domain: greedy accuracy}] for α in ALPHAS] along (1−α)·θ^(a) + α·θ^(b), on the
    held-out problems {domain: examples}; `known` {α: accuracies} are points measured already
    (the branches themselves, and the merge of two branches), not measured again."""
    curve = []
    for alpha in ALPHAS:
        if alpha in known:
            accs = known[alpha]
        else:
            between = interpolate(model_a, model_b, alpha)
            accs = {d: round(accuracy(between, proc, ex, sampling, samples=0)["greedy"], 4) for d, ex in heldout.items()}
        curve.append([alpha, accs])
    return curve


@torch.no_grad()
def ensemble_generate(models: list, proc, prompts: list, cfg: SamplingConfig) -> list:
    """Greedy responses of the output ensemble, y_t = argmax_y 1/K Σ_k π^(k)(y | x, y_<t): each
    model reads the same tokens with its own KV cache. Returns the decoded texts."""
    states = [prefill(m, proc, prompts) for m in models]
    caches, logits = [s.cache for s in states], [s.logits for s in states]
    mask, next_pos = states[0].batch.attention_mask, states[0].pos.max(-1).values + 1
    N = mask.shape[0]
    eos = torch.tensor(proc.eos_ids, device=mask.device)
    done = torch.zeros(N, dtype=torch.bool, device=mask.device)
    tokens = []
    for _ in range(cfg.max_new_tokens):
        probs = torch.stack([sampling_logprobs(lg, cfg, proc).exp() for lg in logits]).mean(0)
        tok = probs.argmax(-1).masked_fill(done, proc.pad_id)
        tokens.append(tok)
        done |= torch.isin(tok, eos)
        if bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(N, 1)], dim=1)
        stepped = [decode_step(m, tok[:, None], mask, next_pos[..., None], c) for m, c in zip(models, caches)]
        logits, caches = [s[0] for s in stepped], [s[1] for s in stepped]
        next_pos = next_pos + 1
    response = torch.stack(tokens, 1)
    return finish(proc, prompts, 1, response, torch.zeros_like(response, dtype=torch.float)).texts


def ensemble_accuracy(models: list, proc, examples: list, sampling: SamplingConfig, batch: int = 256) -> float:
    """The output ensemble's held-out greedy accuracy on `examples`."""
    right = []
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        right.append(score(ensemble_generate(models, proc, [prompt_of(proc, ex) for ex in chunk], sampling), chunk, 1)[1])
    return float(torch.cat(right).mean())


def save_branches(models: dict, folder: str):
    """Branches {domain: model} as FOLDER/<domain>.pt (a state dict, LoRA folded), each written
    whole or not at all: a probe can be rerun later (`load_branches`) without training again."""
    os.makedirs(folder, exist_ok=True)
    for d, m in models.items():
        path = os.path.join(folder, f"{d}.pt")
        try:
            torch.save(folded(m).state_dict(), path + ".tmp")
            os.replace(path + ".tmp", path)
        finally:
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")


def load_branches(folder: str, model0) -> dict:
    """{domain: model} from `save_branches`, each in π_0's architecture."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".pt"):
            out[name[:-3]] = copy.deepcopy(folded(model0))
            out[name[:-3]].load_state_dict(torch.load(os.path.join(folder, name), weights_only=True))
    return out
