"""
The base policy π_0: `--model` (a real checkpoint), or for built-in runs the random-init tiny
Qwen2.5-VL after a supervised pass
on the easy levels of every built-in domain in `WarmStartConfig.shares` (all but rename, which RL
learns against video), so that on the levels runs draw (1..4) it is partly right (30-60%
held-out on every domain, rename included, tests/test_warmstart.py) and RL has both successes and
failures to learn from. Cached on disk in HF format and reused: every
method of every run with the same settings starts from the same π_0.
"""

import glob
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm import tqdm

from evaluate import accuracy, learning_signal
from memory import prepare_for_training
from optim import cosine
from policy import (VISION_FAMILIES, TinyConfig, build_tiny_policy, build_tokenizer, collate, encode_prompt,
                    load_policy, make_processor, position_ids, save_policy)
from rollout import SamplingConfig, full_response_logits
from tasks import DOMAINS, TASKS_VERSION, WORKED_STEPS, DataError, builtin_examples


# The warm start's code, as far as it decides π_0's float order: π_0 is chaotic under float order,
# so a change there makes other π_0s and must not reuse cached ones. 2: one forward per domain.
# 3: the cpu preset's recipe (image's worked steps, video at four times its rows), so that the
# numbers reported for it name one version.
RECIPE_VERSION = 3
ESTIMATE_AFTER = 50                    # warm-start steps timed before the time it will take is printed
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pi0")   # π_0s shipped with the code


@dataclass
class WarmStartConfig:
    steps: int = 3000
    batch_size: int = 72           # per step, split between the domains as `shares`
    lr: float = 2e-3
    train_examples: int = 4000     # per domain
    # arithmetic learns slowest and costs least (no pixels): twice a vision domain's share
    shares: dict = field(default_factory=lambda: {"text": 2, "swap": 2, "image": 1, "video": 1})
    # The levels π_0 is taught; runs draw from 1..difficulty (default 4), so π_0 is fluent on the
    # easy levels and partly right on the rest, which RL has to learn. Video is taught one mover:
    # mixed with several movers the tiny vision tower never learned motion (at chance after 2,000
    # steps); taught one, it learns motion and picks some mover's direction on two or more.
    levels: dict = field(default_factory=lambda: {"text": (1, 2), "swap": (1, 2), "image": (1, 2), "video": (1,)})
    # Domains whose taught responses write worked steps before the answer (tasks.WORKED_STEPS:
    # running totals for text and swap, a running count over the vision tokens for image). Only
    # the answer is graded.
    worked_steps: tuple = ()


def parse_worked_steps(value: str) -> tuple:
    """'image' -> ("image",), 'none' -> (); ValueError naming a domain without worked steps."""
    domains = tuple(sorted({d.strip() for d in value.split(",")} - {"", "none"}))
    unknown = [d for d in domains if d not in WORKED_STEPS]
    if unknown:
        raise ValueError(f"--worked-steps {value}: {', '.join(unknown)} has no worked steps "
                         f"(domains with them: {', '.join(WORKED_STEPS)})")
    return domains


# the tokens a taught response can take: the answer alone; with the worked steps of each domain
# (nine running counts up to 24; five steps like "-9=-36,")
RESPONSE_TOKENS = {"answer": 10, "image": 32, "text": 48, "swap": 48}


def response_tokens(cfg: WarmStartConfig) -> int:
    """The response length π_0 needs, its longest domain's."""
    return max(RESPONSE_TOKENS[d] for d in ("answer", *cfg.worked_steps))


# π_0 of each preset: the tiny model's shape and its warm start (config.presets reads them)
PI0_RECIPES = {
    "smoke": (TinyConfig(), WarmStartConfig(steps=20, batch_size=16, train_examples=200)),
    # image's worked steps make RL teach counting (docs/testbed.md); their 21-token responses take
    # a share of the token-mean loss from video, whose rows four times over keep motion learned
    "cpu": (TinyConfig(), WarmStartConfig(shares={"text": 2, "swap": 2, "image": 1, "video": 4},
                                          worked_steps=("image",))),
    "gpu": (TinyConfig(hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=4, intermediate_size=768),
            WarmStartConfig(steps=1500, batch_size=128)),
}


class ModelError(Exception):
    """A --model that cannot be used: printed as one line, exit code 2."""


def cache_dir():
    return os.environ.get("COPD_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache"))


def check_cache_dir() -> str | None:
    """Why π_0's cache (COPD_CACHE, default ./.cache) cannot be used, or None: checked before
    any work, not after minutes of warm start."""
    path = cache_dir()
    if os.path.exists(path) and not os.path.isdir(path):
        return f"the π_0 cache {path} is a file, not a folder (set COPD_CACHE to a folder)"
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write the π_0 cache {path} (set COPD_CACHE to a folder you can write)"
    return None


def encode_example(model, proc, ex, steps: bool = False):
    """(prompt, target ids, prompt positions): the prompt with its pixels, the answer the warm
    start teaches (after its worked steps if `steps`) followed by EOS, and the prompt's rope
    positions. Encoded once per train example, not once per step that samples it (the rope index
    is a Python loop per row in transformers)."""
    target = proc.tokenizer(ex.target(steps), add_special_tokens=False)["input_ids"] + [proc.eos_ids[0]]
    prompt = encode_prompt(proc, ex.prompt, ex.image, ex.video)
    batch = collate([prompt], proc.pad_id)
    return prompt, target, position_ids(model, batch.input_ids, batch.attention_mask, batch.vision)[..., 0, :]


def sft_loss(model, proc, batches):
    """Cross-entropy of the target answers (and their EOS) given their prompts, the mean over all
    target tokens of `batches` (lists of `encode_example`'s triples, one list per domain). One
    padded forward per list: prompts left-padded, targets right-padded, each response position
    one past the last (as in the sampler). Per domain, because a text prompt is 23 tokens and a
    video prompt 53: one batch of all would pad every text row to the video's length."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for rows in batches:
        T, Lp = max(len(t) for _, t, _ in rows), max(len(p.ids) for p, _, _ in rows)
        response = torch.full((len(rows), T), proc.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros(len(rows), T, device=device)
        positions = torch.zeros(rows[0][2].shape[:-1] + (len(rows), Lp + T), dtype=torch.long)
        for i, (p, t, pos) in enumerate(rows):
            response[i, :len(t)] = torch.tensor(t)
            mask[i, :len(t)] = 1
            positions[..., i, Lp - len(p.ids):Lp] = pos
            positions[..., i, Lp:] = pos.max(-1, keepdim=True).values + 1 + torch.arange(T)
        logits = full_response_logits(model, proc, [p for p, _, _ in rows], response, positions.to(device))
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), response.flatten(), reduction="none")
        total = total + (nll * mask.flatten()).sum()
        tokens += int(mask.sum())
    return total / tokens


def domain_rows(cfg: WarmStartConfig) -> dict:
    """Rows per step of each taught domain: `batch_size` split as `shares`."""
    taught = [d for d in DOMAINS if d in cfg.shares]
    return {d: max(1, cfg.batch_size * cfg.shares[d] // sum(cfg.shares.values())) for d in taught}


def pi0_name(tiny: TinyConfig, cfg: WarmStartConfig, seed: int) -> str:
    """The cache folder's name: a hash of everything that makes π_0 what it is."""
    warm = asdict(cfg)
    if not warm["worked_steps"]:   # a field newer than the shipped π_0s: named only when set, so their names hold
        del warm["worked_steps"]
    recipe = [asdict(tiny), warm, seed, TASKS_VERSION, RECIPE_VERSION]
    return "pi0-" + hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def pi0_of(settings) -> str:
    """What a run starts from, as its results.json `_pi0` records it: --model as given, or the tiny
    π_0's name (its recipe), so that results of another π_0 are never taken for this one's."""
    return settings.model or pi0_name(settings.preset.tiny, settings.preset.warm, settings.seed)


def shipped_pi0(name: str) -> str | None:
    """The folder of pi0/ that ships this π_0 with the code (its NAME file holds `name`), or None.
    Shipped π_0s make every machine start from the same weights: π_0 is chaotic under float order,
    so another CPU building the same recipe gets another draw (docs/testbed.md)."""
    for name_file in sorted(glob.glob(os.path.join(SHIPPED, "*", "NAME"))):
        with open(name_file) as f:
            if f.read().strip() == name:
                return os.path.dirname(name_file)
    return None


def pi0_cached(tiny: TinyConfig, cfg: WarmStartConfig, seed: int):
    """Where this π_0 is, and whether it is there (complete): shipped with the code, else the cache."""
    name = pi0_name(tiny, cfg, seed)
    shipped = shipped_pi0(name)
    if shipped:
        return shipped, True
    path = os.path.join(cache_dir(), name)
    return path, os.path.isfile(os.path.join(path, "config.json"))


def build_pi0(tiny: TinyConfig, cfg: WarmStartConfig, seed: int, quiet: bool = False, device="cpu"):
    """π_0 (model, processor) trained afresh by the warm start's `cfg.steps` supervised steps, and
    the seconds it took; after ESTIMATE_AFTER steps, a line says how long it will take."""
    tokenizer = build_tokenizer()
    model = build_tiny_policy(tokenizer, tiny, seed).to(device)
    proc = make_processor(tokenizer, model)
    share = domain_rows(cfg)   # rename is not taught: RL must learn it against video
    data = {d: [encode_example(model, proc, ex, d in cfg.worked_steps)
                for ex in builtin_examples(d, "train", cfg.train_examples, seed, levels=cfg.levels[d])]
            for d in share}
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    # linear warm-up, then cosine down to 10%: π_0 ends settled, not mid-oscillation
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * cosine(s / cfg.steps, 0.1))
    model.train()
    started = time.time()
    bar = tqdm(range(cfg.steps), desc="warm start (SFT for π_0)", disable=True if quiet else None, leave=False)
    for step in bar:
        if step == ESTIMATE_AFTER and not quiet:   # a line that reaches a log file, where the bar does not
            minutes = (time.time() - started) / ESTIMATE_AFTER * cfg.steps / 60
            print(f"π_0: about {minutes:.0f} minutes in all (from its first {ESTIMATE_AFTER} steps)", flush=True)
        loss = sft_loss(model, proc, [rng.sample(data[d], n) for d, n in share.items()])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model, proc, time.time() - started


def save_pi0(model, proc, path: str, name: str, replace: bool = False):
    """Write π_0 and its NAME (pi0_name) to `path`: written beside it and renamed into place when
    complete, so a killed build leaves no half π_0. A π_0 already there stays (another run
    finished the same one first) unless `replace`."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    save_policy(model, proc, tmp)
    with open(os.path.join(tmp, "NAME"), "w") as f:
        f.write(name + "\n")
    if replace:
        shutil.rmtree(path, ignore_errors=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another run finished the same π_0 first
        shutil.rmtree(tmp, ignore_errors=True)


def warm_start(tiny: TinyConfig, cfg: WarmStartConfig, seed: int, quiet: bool = False, device="cpu"):
    """π_0 (model, processor) on `device`: shipped with the code, or cached, or built and cached."""
    path, found = pi0_cached(tiny, cfg, seed)
    if found:
        try:
            model, proc = load_policy(path, device=device)
            if not quiet and path.startswith(SHIPPED):
                print(f"π_0: shipped with the code, {os.path.relpath(path, os.path.dirname(SHIPPED))}", flush=True)
            return model, proc
        except Exception as e:   # a truncated or half-deleted entry: safetensors, OSError, JSON errors
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            kind = "shipped" if path.startswith(SHIPPED) else "cached"
            print(f"warning: the {kind} π_0 {path} is damaged ({why}); building it again", file=sys.stderr, flush=True)
            if not path.startswith(SHIPPED):
                shutil.rmtree(path, ignore_errors=True)
    name = pi0_name(tiny, cfg, seed)
    path = os.path.join(cache_dir(), name)
    if not quiet:
        print(f"π_0: neither shipped nor in the cache; a warm start of {cfg.steps} supervised steps builds it ({path})",
              flush=True)
    model, proc, seconds = build_pi0(tiny, cfg, seed, quiet, device)
    save_pi0(model, proc, path, name)
    if not quiet:
        print(f"π_0: warm start, {cfg.steps} supervised steps, {seconds:.0f} s; cached in {path}", flush=True)
    return load_policy(path, device=device)


def pi0_accuracy(model, proc, seed: int = 0, problems: int = 1000, difficulty: int = 4,
                 sampling: SamplingConfig = SamplingConfig(max_new_tokens=RESPONSE_TOKENS["answer"])) -> dict:
    """Greedy accuracy on every built-in domain: on `problems` distinct held-out problems of the
    levels runs draw (1..difficulty; overall and per level), and on as many training problems of
    the same levels, which a π_0 that had memorised its warm start would answer far better."""
    out = {}
    for domain in DOMAINS:
        held = builtin_examples(domain, "heldout", problems, seed, difficulty)
        levels = sorted(Counter(e.level for e in held).items())
        train = [ex for level, k in levels for ex in builtin_examples(domain, "train", k, seed, levels=(level,))]
        per_level = {level: accuracy(model, proc, [e for e in held if e.level == level], sampling, 0)["greedy"]
                     for level, _ in levels}
        out[domain] = {"heldout": sum(per_level[level] * k for level, k in levels) / len(held),
                       "train": accuracy(model, proc, train, sampling, 0)["greedy"], "per_level": per_level}
    return out


# -----------------------------------------------------------------------------
# π_0 of a run: --model, or the warm-started tiny policy

def check_family(model: str, experts: tuple):
    """A vision-language family whose images this code cannot feed is refused for image and
    video experts (from its config alone, before its weights load); text experts train it."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model)
    vision = set(experts) - {"text"}
    if vision and hasattr(config, "vision_config") and config.model_type not in VISION_FAMILIES:
        raise ModelError(f"--model {model}: {config.model_type} is a vision-language family whose image and video "
                         f"inputs this code does not build (it supports {', '.join(VISION_FAMILIES)}); "
                         f"--experts {','.join(vision)} needs one of those, --experts text trains this one")


def load_pi0(settings, dtype):
    """π_0 and its processor for a run's config.Settings: --model, or the warm-started tiny
    policy; then the memory options (LoRA, gradient checkpointing). `dtype`: the weights'."""
    if settings.model:
        try:
            check_family(settings.model, settings.experts)
            model, proc = load_policy(settings.model, dtype=dtype, device=settings.device)
        except (OSError, ValueError, KeyError) as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if not os.path.isdir(settings.model):   # a hub name
                raise ModelError(f"--model {settings.model}: could not fetch it from the Hugging Face Hub ({why}); "
                                 f"without internet, download it elsewhere (huggingface-cli download {settings.model} "
                                 "--local-dir DIR), copy DIR here and pass --model DIR") from None
            raise ModelError(f"--model {settings.model}: cannot load it ({why})") from None
    else:
        p = settings.preset
        model, proc = warm_start(p.tiny, p.warm, settings.seed, device=settings.device)
        model = model.to(dtype)
    try:
        model = prepare_for_training(model, settings.lora_rank, settings.grad_ckpt)
    except ValueError as e:
        raise ModelError(str(e)) from None
    if not proc.is_vl and set(settings.experts) - {"text"}:
        raise ModelError(f"--model {settings.model} is text-only: it cannot learn "
                         f"{', '.join(d for d in settings.experts if d != 'text')}")
    return model, proc


if __name__ == "__main__":
    # π_0 built ahead of the runs that share it (reproduce.py does this in its own lane)
    import argparse

    ap = argparse.ArgumentParser(description="Find (shipped or cached) or build the π_0 of a preset and seed.")
    ap.add_argument("--preset", default="cpu", choices=sorted(PI0_RECIPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rebuild", action="store_true",
                    help="build it afresh (about 10 minutes a cpu π_0 on one core) and ship it: write it to "
                         "pi0/PRESET-seedSEED, where every run finds it")
    ap.add_argument("--accuracy", action="store_true", help="then print its held-out and train accuracy per domain")
    ap.add_argument("--problems", type=int, default=1000, help="distinct problems per domain for --accuracy")
    ap.add_argument("--signal", type=int, default=0, metavar="K",
                    help="then, per domain and level, what GRPO can learn from it with K samples a prompt "
                         "(greedy, pass@K, all-equal groups, systematic errors; --problems per level)")
    ap.add_argument("--worked-steps", default=None, metavar="D,D",
                    help="the π_0 taught to write worked steps before its answers in these domains "
                         "(text, swap, image; none: no domain), instead of the preset's")
    a = ap.parse_args()
    tiny, warm = PI0_RECIPES[a.preset]
    try:
        if a.worked_steps is not None:
            warm = replace(warm, worked_steps=parse_worked_steps(a.worked_steps))
    except ValueError as e:
        sys.exit(f"warmstart.py: {e}")
    sampling = SamplingConfig(max_new_tokens=response_tokens(warm))
    if a.rebuild:
        steps = "" if warm == PI0_RECIPES[a.preset][1] else "-steps-" + ("-".join(warm.worked_steps) or "none")
        path = os.path.join(SHIPPED, f"{a.preset}-seed{a.seed}{steps}")
        print(f"π_0: a warm start of {warm.steps} supervised steps builds it afresh for {path}", flush=True)
        model, proc, seconds = build_pi0(tiny, warm, a.seed)
        save_pi0(model, proc, path, pi0_name(tiny, warm, a.seed), replace=True)
        print(f"π_0: warm start, {warm.steps} supervised steps, {seconds:.0f} s; shipped in {path}", flush=True)
    else:
        model, proc = warm_start(tiny, warm, a.seed)
    if a.accuracy:
        print(f"π_0 of --preset {a.preset} --seed {a.seed}, greedy accuracy (%), {a.problems} distinct problems per domain:")
        print("| domain | held-out | train, same levels | held-out per level |\n|---|---|---|---|")
        for domain, acc in pi0_accuracy(model, proc, a.seed, a.problems, sampling=sampling).items():
            levels = ", ".join(f"{100 * v:.0f}" for v in acc["per_level"].values())
            print(f"| {domain} | {100 * acc['heldout']:.1f} | {100 * acc['train']:.1f} | {levels} |")
    if a.signal:
        print(f"\nWhat GRPO can learn from π_0 (%), {a.signal} samples a prompt at temperature 1, {a.problems} distinct "
              "held-out problems per level:")
        print(f"| domain | level | greedy | pass@{a.signal} | all {a.signal} rewards equal | one wrong answer every time |")
        print("|---|---|---|---|---|---|")
        for domain in DOMAINS:
            for level in range(1, 5):
                try:
                    held = builtin_examples(domain, "heldout", a.problems, a.seed, levels=(level,))
                except DataError as e:   # video's one mover: 84 problems in all
                    print(f"| {domain} | {level} | {e} | | | |")
                    continue
                s = learning_signal(model, proc, held, sampling, a.signal)
                print(f"| {domain} | {level} | {100 * s['greedy']:.1f} | {100 * s[f'pass@{a.signal}']:.1f} | "
                      f"{100 * s['zero_advantage']:.1f} | {100 * s['systematic']:.1f} |", flush=True)
