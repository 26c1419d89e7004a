"""
What a run is asked to do: the presets (dataclasses with defaults that run), the command line,
the checks that refuse bad input before anything is written, and π_0 (the warm-started tiny
policy, or --model).

Method names are spelled here and only here: train.py and report.py use these tuples.
"""

import argparse
import math
import os
import re
from dataclasses import dataclass, field, replace

import torch

import parallel
from checkpoint import list_checkpoints, recorded_settings
from opd import OPDConfig
from memory import prepare_for_training
from policy import VISION_FAMILIES, TinyConfig, load_policy
from rlvr import RLConfig
from rollout import SamplingConfig
from tasks import DOMAINS, DataError, load_jsonl
from warmstart import WarmStartConfig, warm_start

METHODS = ("base", "rlvr", "experts", "mixed", "opd", "mopd", "copd", "copd@equal", "all")
# the stages each --method runs, in order; a method not listed runs π_0's eval, then itself
STAGES = {"all": ("base", "experts", "mixed", "opd", "mopd", "copd", "copd@equal"), "rlvr": ("base", "experts")}
NEEDS_TWO_DOMAINS = ("mixed", "opd", "mopd", "copd", "copd@equal", "all")
TOPOLOGIES = ("hub", "all-pairs")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HUB_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")   # owner/name on the Hugging Face Hub


def stages(method: str) -> tuple:
    return STAGES.get(method, ("base", method))


@dataclass
class Preset:
    steps: int = 60                    # T: GRPO steps of one expert; mixed and CoPD get K·T
    max_total_steps: int = 0           # if set, T = min(steps, this // K): K·T stays within it as experts are added
    cycles: int = 4                    # N of CoPD
    difficulty: int = 4                  # tasks.py: levels 1..difficulty; π_0 is taught the easy ones
    train_pool: int = 4000             # training prompts per domain
    eval_size: int = 400               # held-out prompts per domain, final eval
    curve_eval_size: int = 100         # held-out prompts per domain, evals during training
    eval_every: int = 20
    eval_samples: int = 2              # sampled responses per prompt for the mean-over-samples accuracy
    divergence_every: int = 20
    divergence_prompts: int = 16
    lr: float = 2e-4                   # η, the peak learning rate of every loop
    lr_schedule: str = "cosine"        # "cosine" (η down to min_lr_frac·η at a loop's last update) | "constant"
    min_lr_frac: float = 0.1
    tiny: TinyConfig = field(default_factory=TinyConfig)
    warm: WarmStartConfig = field(default_factory=WarmStartConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    opd: OPDConfig = field(default_factory=OPDConfig)


def presets():
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=10)
    smoke = Preset(steps=4, cycles=2, train_pool=200, eval_size=16, curve_eval_size=8, eval_every=2,
                   eval_samples=1, divergence_every=2, divergence_prompts=4,
                   warm=WarmStartConfig(steps=20, batch_size=16, train_examples=200),
                   rl=RLConfig(prompts_per_step=4, group_size=4, sampling=sampling),
                   opd=OPDConfig(prompts_per_step=4, samples_per_prompt=2, metric_rows=8))
    cpu = Preset(steps=300, max_total_steps=600, cycles=4, lr=2e-4,
                 eval_every=50, eval_size=1000, curve_eval_size=200,
                 rl=RLConfig(prompts_per_step=16, group_size=8, sampling=sampling),
                 opd=OPDConfig(prompts_per_step=8, samples_per_prompt=8))
    gpu = Preset(steps=200, cycles=8, eval_size=1000, curve_eval_size=200,
                 tiny=TinyConfig(hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=4, intermediate_size=768),
                 warm=WarmStartConfig(steps=1500, batch_size=128),
                 rl=RLConfig(prompts_per_step=64, group_size=8, micro_batch=512, sampling=sampling),
                 opd=OPDConfig(prompts_per_step=32, samples_per_prompt=8))
    return {"smoke": smoke, "cpu": cpu, "gpu": gpu}


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""


# -----------------------------------------------------------------------------
# the command line

def parse_args(argv=None, description: str = ""):
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", default="text,image", help="comma-separated domains: text,image,video,swap")
    ap.add_argument("--method", default="copd", help="|".join(METHODS))
    ap.add_argument("--preset", default="cpu", help="smoke | cpu | gpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default runs/<method>-<experts>-s<seed>)")
    ap.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    ap.add_argument("--ckpt-every", type=int, default=50, help="checkpoint every N steps of any loop (0: never)")
    ap.add_argument("--model", default=None, help="a checkpoint (hub name or folder) instead of the tiny π_0")
    ap.add_argument("--data", action="append", default=[], metavar="DOMAIN=PATH", help="JSONL prompts of a domain")
    ap.add_argument("--steps", type=int, default=None, help="T, GRPO steps per expert (overrides the preset)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate η (overrides the preset)")
    ap.add_argument("--lr-schedule", default=None, help="cosine | constant")
    ap.add_argument("--opd-loss", default=None, help="sampled | full | topk")
    ap.add_argument("--opd-beta", type=float, default=None,
                    help="β of Eq. 8, the weight of the OPD advantages beside GRPO's in one update (default 1)")
    ap.add_argument("--loss-agg", default=None, help="token | seq | seq_len_max")
    ap.add_argument("--advantage", default=None, help="grpo | dr_grpo")
    ap.add_argument("--topology", default="hub", help=" | ".join(TOPOLOGIES) + " (three or more experts)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="response length cap (overrides the preset)")
    ap.add_argument("--max-prompt-tokens", type=int, default=None,
                    help="refuse longer --data prompts (default: the model's context minus --max-new-tokens)")
    ap.add_argument("--micro-batch", type=int, default=None, help="rows per forward/backward (overrides the preset)")
    ap.add_argument("--dtype", default="fp32", help="fp32 | bf16: the weights' dtype (bf16 halves them)")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing: recompute activations in backward")
    ap.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (needs peft); 0: all weights")
    ap.add_argument("--dist-timeout", type=float, default=900,
                    help="under torchrun: seconds a rank waits for the others before giving up")
    return ap.parse_args(argv)


def validate(args) -> Preset:
    """Every check that can fail before anything is written; returns the preset with the flags
    applied. Reads the disk, never writes or deletes (clearing for --overwrite is the run's)."""
    args.experts = [d.strip() for d in args.experts.split(",") if d.strip()]
    for d in args.experts:
        if d not in DOMAINS:
            raise UsageError(f"unknown domain '{d}' in --experts (choose from {', '.join(DOMAINS)})")
    if len(set(args.experts)) != len(args.experts):
        raise UsageError("--experts lists a domain twice")
    if args.method not in METHODS:
        raise UsageError(f"unknown method '{args.method}' (choose from {', '.join(METHODS)})")
    if args.method in NEEDS_TWO_DOMAINS and len(args.experts) < 2:
        raise UsageError(f"--method {args.method} needs at least two experts, e.g. --experts text,image")
    if args.preset not in presets():
        raise UsageError(f"unknown preset '{args.preset}' (choose from {', '.join(presets())})")
    if args.dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{args.dtype}' (choose from {', '.join(DTYPES)})")
    if args.lora_rank < 0:
        raise UsageError("--lora-rank must be 0 (train every weight) or a positive rank")
    if args.topology not in TOPOLOGIES:
        raise UsageError(f"unknown topology '{args.topology}' ({' or '.join(TOPOLOGIES)})")
    data = {}
    for item in args.data:
        domain, sep, path = item.partition("=")
        if not sep or domain not in DOMAINS:
            raise UsageError(f"--data expects DOMAIN=PATH with DOMAIN in {', '.join(DOMAINS)}, got '{item}'")
        data[domain] = path
    args.data = data
    if args.model and not os.path.isdir(args.model):
        if os.path.exists(args.model):
            raise UsageError(f"--model {args.model}: not a folder (pass the checkpoint's folder)")
        if not HUB_NAME_RE.match(args.model):
            raise UsageError(f"--model {args.model}: no such folder (nor a hub name like Qwen/Qwen2.5-VL-3B-Instruct)")
    for flag, name in ((args.steps, "--steps"), (args.max_new_tokens, "--max-new-tokens"),
                       (args.micro_batch, "--micro-batch"), (args.max_prompt_tokens, "--max-prompt-tokens")):
        if flag is not None and flag < 1:
            raise UsageError(f"{name} must be at least 1, got {flag}")
    if args.ckpt_every < 0:
        raise UsageError(f"--ckpt-every must be 0 (never) or a positive number of steps, got {args.ckpt_every}")
    if not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        raise UsageError(f"--dist-timeout must be a positive number of seconds, got {args.dist_timeout}")
    check_device(args.device)
    args.out = args.out or os.path.join("runs", f"{args.method}-{'-'.join(args.experts)}-s{args.seed}")
    check_out(args.out)
    earlier = os.path.exists(os.path.join(args.out, "results.json")) or list_checkpoints(args.out)
    if earlier and not (args.overwrite or args.resume):
        raise UsageError(f"{args.out} already holds a run: pass --resume, --overwrite or another --out")
    preset = presets()[args.preset]
    if args.steps is not None:
        preset.steps = args.steps
    elif preset.max_total_steps:
        preset.steps = min(preset.steps, preset.max_total_steps // len(args.experts))
    if args.lr is not None:
        if not (math.isfinite(args.lr) and args.lr > 0):
            raise UsageError(f"--lr must be a positive number, got {args.lr}")
        preset.lr = args.lr
    if args.opd_beta is not None:
        if not (math.isfinite(args.opd_beta) and args.opd_beta >= 0):
            raise UsageError(f"--opd-beta must be a number ≥ 0, got {args.opd_beta}")
        preset.opd.beta = args.opd_beta
    if args.max_new_tokens:
        preset.rl.sampling = replace(preset.rl.sampling, max_new_tokens=args.max_new_tokens)
    if args.micro_batch:
        preset.rl.micro_batch = args.micro_batch
    for flag, target, name, choices in ((args.opd_loss, preset.opd, "loss", ("sampled", "full", "topk")),
                                        (args.loss_agg, preset.rl, "loss_agg", ("token", "seq", "seq_len_max")),
                                        (args.advantage, preset.rl, "advantage", ("grpo", "dr_grpo")),
                                        (args.lr_schedule, preset, "lr_schedule", ("cosine", "constant"))):
        if flag is not None:
            if flag not in choices:
                raise UsageError(f"unknown value '{flag}' (choose from {', '.join(choices)})")
            setattr(target, name, flag)
    if args.resume:
        check_resume(args.out, settings(args, preset))
    return preset


def check_device(device: str):
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device}: not a device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this torch ({torch.__version__}) has no CUDA, or sees no GPU; "
                         "use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} GPUs")


def check_out(out: str):
    """--out must be a folder this process can write (noticed now, not after π_0 is built)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: a file, not a folder")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not (os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)):
        raise UsageError(f"--out {out}: cannot write in {parent}")


def settings(args, preset: Preset) -> dict:
    """The flags that define a run's results, as resolved: every checkpoint records them, and a
    --resume under other values is refused."""
    return {"--experts": ",".join(args.experts), "--method": args.method, "--preset": args.preset,
            "--seed": args.seed, "--steps": preset.steps, "--model": args.model,
            "--data": ",".join(f"{d}={p}" for d, p in sorted(args.data.items())), "--lr": preset.lr,
            "--lr-schedule": preset.lr_schedule, "--opd-loss": preset.opd.loss, "--opd-beta": preset.opd.beta, "--loss-agg": preset.rl.loss_agg,
            "--advantage": preset.rl.advantage, "--topology": args.topology,
            "--max-new-tokens": preset.rl.sampling.max_new_tokens, "--dtype": args.dtype, "--lora-rank": args.lora_rank}


def check_resume(out: str, now: dict):
    before = recorded_settings(out)
    if not before:    # nothing to resume yet, or a checkpoint from before settings were recorded
        return
    differ = [f"{flag} {before.get(flag)} (now {value})" for flag, value in now.items() if before.get(flag) != value]
    if differ:
        raise UsageError(f"--resume: {out} holds a run with other settings: {'; '.join(differ)}. Resume with "
                         "its settings, or start over with --overwrite")


def check_data(args, preset: Preset, model, proc):
    """Every prompt of every --data file (its rows were validated before π_0 loaded) within the
    token limit: --max-prompt-tokens, or the model's context minus the response."""
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    limit = args.max_prompt_tokens or (context - preset.rl.sampling.max_new_tokens if context else None)
    if not limit:
        return
    count = lambda text: len(proc.tokenizer(text, add_special_tokens=False)["input_ids"])
    for domain, path in args.data.items():
        for ex in load_jsonl(path, domain):   # every row, whichever split it falls in
            n = count(ex.prompt[:20 * limit])   # a prefix first: a 10 MB prompt is refused in a moment
            if n <= limit < len(ex.prompt) // 20:
                n = count(ex.prompt)
            if n > limit:
                raise DataError(f"{ex.source}: the prompt is {'at least ' if len(ex.prompt) > 20 * limit else ''}"
                                f"{n} tokens, over the limit of {limit} (the model's context minus "
                                "--max-new-tokens, or --max-prompt-tokens)")


def start_ranks(args, preset: Preset):
    """Under torchrun: refuse what one branch per rank rules out, then join the process group
    (parallel.py). Returns the Layout: which branch and replica this rank holds."""
    if args.method not in ("copd", "copd@equal"):
        raise UsageError(f"under torchrun only --method copd or copd@equal runs (its branches are what the ranks "
                         f"split); run --method {args.method} as one process")
    if args.resume:
        raise UsageError("--resume is not available under torchrun: rerun, or run as one process")
    if preset.opd.loss != "sampled":
        raise UsageError(f"--opd-loss {preset.opd.loss} needs whole teacher distributions, which "
                         "ranks do not exchange: use --opd-loss sampled under torchrun")
    args.ckpt_every = 0   # checkpoints hold every branch: one process only
    try:
        layout = parallel.start(args.experts, args.dist_timeout)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.device.startswith("cuda"):
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return layout


def check_family(model: str, experts: list):
    """A vision-language family whose images this code cannot feed is refused for image and
    video experts (from its config alone, before its weights load); text experts train it."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model)
    vision = set(experts) - {"text"}
    if vision and hasattr(config, "vision_config") and config.model_type not in VISION_FAMILIES:
        raise UsageError(f"--model {model}: {config.model_type} is a vision-language family whose image and video "
                         f"inputs this code does not build (it supports {', '.join(VISION_FAMILIES)}); "
                         f"--experts {','.join(vision)} needs one of those, --experts text trains this one")


def load_base(args, preset: Preset):
    """π_0 and its processor: --model, or the warm-started tiny policy; then the memory options."""
    if args.model:
        try:
            check_family(args.model, args.experts)
            model, proc = load_policy(args.model, dtype=DTYPES[args.dtype], device=args.device)
        except (OSError, ValueError, KeyError) as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if not os.path.isdir(args.model):   # a hub name
                raise UsageError(f"--model {args.model}: could not fetch it from the Hugging Face Hub ({why}); "
                                 f"without internet, download it elsewhere (huggingface-cli download {args.model} "
                                 "--local-dir DIR), copy DIR here and pass --model DIR") from None
            raise UsageError(f"--model {args.model}: cannot load it ({why})") from None
    else:
        model, proc = warm_start(preset.tiny, preset.warm, args.seed,
                                 device=args.device)
        model = model.to(DTYPES[args.dtype])
    try:
        model = prepare_for_training(model, args.lora_rank, args.grad_ckpt)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not proc.is_vl and set(args.experts) - {"text"}:
        raise UsageError(f"--model {args.model} is text-only: it cannot learn "
                         f"{', '.join(d for d in args.experts if d != 'text')}")
    return model, proc
