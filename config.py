"""
What a run is asked to do: the presets (dataclasses with defaults that run), the command line,
and the checks that refuse bad input before anything is written. `validate` turns the command
line into `Settings`, a frozen value every other file reads.

The methods are declared here, in METHODS; train.py maps each stage to the code that runs it.
"""

import argparse
import copy
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch

from checkpoint import file_digest, list_checkpoints, why_not_out, why_not_resume
from opd import OPDConfig
from policy import TinyConfig
from rlvr import RLConfig
from rollout import SamplingConfig
from tasks import DOMAINS
from warmstart import PI0_RECIPES, WarmStartConfig, check_cache_dir


@dataclass(frozen=True)
class Method:
    stages: tuple                      # run in order; a resumed run skips the finished ones
    copies: Callable                   # K -> (trained, frozen) model copies at the peak (the memory plan)
    min_experts: int = 2


METHODS = {
    "base": Method(("base",), lambda K: (0, 1), 1),
    "rlvr": Method(("base", "experts"), lambda K: (1, K), 1),
    "experts": Method(("base", "experts"), lambda K: (1, K), 1),
    "mixed": Method(("base", "mixed"), lambda K: (1, 1)),
    "opd": Method(("base", "opd"), lambda K: (1, K + 1)),           # the experts first, then the students
    "mopd": Method(("base", "mopd"), lambda K: (1, K + 1)),
    "copd": Method(("base", "copd"), lambda K: (K, 1)),
    "copd@equal": Method(("base", "copd@equal"), lambda K: (K, 1)),
    "copd+equal": Method(("base", "copd", "copd@equal"), lambda K: (K, 1)),   # both budgets (the pull study)
    "all": Method(("base", "experts", "mixed", "opd", "mopd", "copd", "copd@equal"), lambda K: (K, K + 1)),
}
TOPOLOGIES = ("hub", "all-pairs")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HUB_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")   # owner/name on the Hugging Face Hub
CHOICES = {"opd_loss": ("sampled", "full", "topk"), "loss_agg": ("token", "seq", "seq_len_max"),
           "advantage": ("grpo", "dr_grpo"), "lr_schedule": ("cosine", "constant")}


@dataclass
class Preset:
    steps: int = 60                    # T: GRPO steps of one expert; mixed and CoPD get K·T
    max_total_steps: int = 0           # if set, T = min(steps, this // K): K·T stays within it as experts are added
    cycles: int = 4                    # N of CoPD
    difficulty: int = 4                # tasks.py: levels 1..difficulty; π_0 is taught the easy ones
    train_levels: tuple = ()           # the levels training prompts draw (evals draw 1..difficulty); () = the same
    rename_trade: float = 1.0          # tasks.make_rename: the share of rename's clips that trade names (the conflict)
    rl_opd_ratio: float = 1.5          # CoPD's S_RL : S_OPD (the paper's best; its ablation: 1.5, 1, 0.5)
    train_pool: int = 4000             # training prompts per domain
    eval_size: int = 400               # held-out prompts per domain, final eval
    curve_eval_size: int = 100         # held-out prompts per domain, evals during training
    eval_every: int = 20
    eval_samples: int = 2              # sampled responses per prompt for the mean-over-samples accuracy
    divergence_every: int = 20
    divergence_prompts: int = 64        # held-out prompts (x 2 samples) per overlap measurement
    lr: float = 2e-4                   # η, the peak learning rate of every loop
    lr_schedule: str = "cosine"        # "cosine" (η down to min_lr_frac·η at a loop's last update) | "constant"
    min_lr_frac: float = 0.1
    tiny: TinyConfig = field(default_factory=TinyConfig)
    warm: WarmStartConfig = field(default_factory=WarmStartConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    opd: OPDConfig = field(default_factory=OPDConfig)


def presets():
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=10)
    tiny_and_warm = lambda name: dict(zip(("tiny", "warm"), copy.deepcopy(PI0_RECIPES[name])))   # warmstart.py
    smoke = Preset(steps=4, cycles=2, train_pool=200, eval_size=16, curve_eval_size=8, eval_every=2,
                   eval_samples=1, divergence_every=2, divergence_prompts=4, **tiny_and_warm("smoke"),
                   rl=RLConfig(prompts_per_step=4, group_size=4, sampling=sampling),
                   opd=OPDConfig(prompts_per_step=4, samples_per_prompt=2, metric_rows=8))
    cpu = Preset(steps=300, max_total_steps=600, cycles=4, lr=2e-4,
                 eval_every=50, eval_size=1000, curve_eval_size=200, **tiny_and_warm("cpu"),
                 rl=RLConfig(prompts_per_step=16, group_size=8, sampling=sampling),
                 opd=OPDConfig(prompts_per_step=8, samples_per_prompt=8))
    gpu = Preset(steps=200, cycles=8, eval_size=1000, curve_eval_size=200, **tiny_and_warm("gpu"),
                 rl=RLConfig(prompts_per_step=64, group_size=8, micro_batch=512, sampling=sampling),
                 opd=OPDConfig(prompts_per_step=32, samples_per_prompt=8))
    return {"smoke": smoke, "cpu": cpu, "gpu": gpu}


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""


@dataclass(frozen=True)
class Settings:
    """One run's settings, resolved: the flags checked, the preset with the flags applied."""
    experts: tuple
    method: str
    preset_name: str
    preset: Preset
    seed: int
    out: str
    overwrite: bool
    resume: bool
    ckpt_every: int                    # 0 under torchrun: a checkpoint holds every branch
    model: str | None
    data: dict                         # {domain: JSONL path}
    topology: str
    device: str                        # under torchrun: cuda:LOCAL_RANK
    max_prompt_tokens: int | None
    dtype: str
    grad_ckpt: bool
    lora_rank: int
    dist_timeout: float
    data_digest: dict = field(default_factory=dict)   # {domain: sha256 of its --data file}: a resume checks contents

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    def as_dict(self) -> dict:
        return asdict(self)

    def recorded(self) -> dict:
        """The flags that define a run's results, as resolved: every checkpoint records them, and
        a --resume under other values is refused."""
        p = self.preset
        return {"--experts": ",".join(self.experts), "--method": self.method, "--preset": self.preset_name,
                "--seed": self.seed, "--steps": p.steps, "--model": self.model,
                "--data": ",".join(f"{d}=sha256:{self.data_digest.get(d)}" for d in sorted(self.data)), "--lr": p.lr,
                "--lr-schedule": p.lr_schedule, "--opd-loss": p.opd.loss, "--opd-beta": p.opd.beta,
                "--train-levels": ",".join(map(str, p.train_levels)), "--rename-trade": p.rename_trade, "--rl-opd-ratio": p.rl_opd_ratio, "--loss-agg": p.rl.loss_agg, "--advantage": p.rl.advantage, "--topology": self.topology,
                "--max-new-tokens": p.rl.sampling.max_new_tokens, "--dtype": self.dtype, "--lora-rank": self.lora_rank}


# -----------------------------------------------------------------------------
# the command line

class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag as one line (UsageError), not the usage text and a line."""

    def error(self, message):
        raise UsageError(message)


def parse_args(argv=None, description: str = ""):
    ap = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", default="text,image", help="comma-separated domains: " + ",".join(DOMAINS))
    ap.add_argument("--method", default="copd", help="|".join(METHODS))
    ap.add_argument("--preset", default="cpu", help="smoke | cpu | gpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default runs/<method>-<experts>-s<seed>)")
    ap.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    ap.add_argument("--ckpt-every", type=int, default=50, help="checkpoint every N steps of any loop (0: never)")
    ap.add_argument("--model", default=None, help="a checkpoint (hub name or folder) instead of the tiny π_0")
    ap.add_argument("--data", action="append", default=[], metavar="DOMAIN=PATH", help="JSONL prompts of a domain")
    for flag, kind, what in (("--steps", int, "T, GRPO steps per expert"), ("--lr", float, "peak learning rate η"),
                             ("--max-new-tokens", int, "response length cap"),
                             ("--micro-batch", int, "rows per forward/backward")):
        ap.add_argument(flag, type=kind, default=None, help=f"{what} (overrides the preset)")
    for name, choices in CHOICES.items():
        ap.add_argument("--" + name.replace("_", "-"), default=None, help=" | ".join(choices))
    ap.add_argument("--opd-beta", type=float, default=None,
                    help="β of Eq. 8, the weight of the OPD advantages beside GRPO's in one update (default 1)")
    ap.add_argument("--train-levels", default=None, metavar="L,L",
                    help="built-in tasks: the levels training prompts draw (default all; evals draw all)")
    ap.add_argument("--rename-trade", type=float, default=None,
                    help="rename's conflict with video: the share of its clips whose squares trade names "
                         "(default 1; 0: video's task on a grey background)")
    ap.add_argument("--rl-opd-ratio", type=float, default=None,
                    help="CoPD's S_RL : S_OPD, Phase I steps per Phase II step (default 1.5, the paper's best)")
    ap.add_argument("--topology", default="hub", help=" | ".join(TOPOLOGIES) + " (three or more experts)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-prompt-tokens", type=int, default=None,
                    help="refuse longer --data prompts (default: the model's context minus --max-new-tokens)")
    ap.add_argument("--dtype", default="fp32", help="fp32 | bf16: the weights' dtype (bf16 halves them)")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing: recompute activations in backward")
    ap.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (needs peft); 0: all weights")
    ap.add_argument("--dist-timeout", type=float, default=900,
                    help="under torchrun: seconds a rank waits for the others before giving up")
    return ap.parse_args(argv)


# -----------------------------------------------------------------------------
# the checks

def validate(args) -> Settings:
    """Every check that can fail before anything is written; returns the run's Settings. Reads
    the disk, never writes or deletes (clearing for --overwrite is the run's)."""
    experts = tuple(d.strip() for d in args.experts.split(",") if d.strip())
    if not experts:
        raise UsageError(f"--experts names no domain (choose from {', '.join(DOMAINS)}, e.g. --experts text,image)")
    for d in experts:
        if d not in DOMAINS:
            raise UsageError(f"unknown domain '{d}' in --experts (choose from {', '.join(DOMAINS)})")
    if len(set(experts)) != len(experts):
        raise UsageError("--experts lists a domain twice")
    if args.method not in METHODS:
        raise UsageError(f"unknown method '{args.method}' (choose from {', '.join(METHODS)})")
    if len(experts) < METHODS[args.method].min_experts:
        raise UsageError(f"--method {args.method} needs at least two experts, e.g. --experts text,image")
    if args.preset not in presets():
        raise UsageError(f"unknown preset '{args.preset}' (choose from {', '.join(presets())})")
    for value, name, choices in ((args.dtype, "dtype", DTYPES), (args.topology, "topology", TOPOLOGIES)):
        if value not in choices:
            raise UsageError(f"unknown {name} '{value}' (choose from {', '.join(choices)})")
    if args.lora_rank < 0:
        raise UsageError("--lora-rank must be 0 (train every weight) or a positive rank")
    if not 0 <= args.seed < 2 ** 63:
        raise UsageError(f"--seed must be from 0 to 2^63 - 1, got {args.seed}")
    data = {}
    for item in args.data:
        domain, sep, path = item.partition("=")
        if not sep or domain not in DOMAINS:
            raise UsageError(f"--data expects DOMAIN=PATH with DOMAIN in {', '.join(DOMAINS)}, got '{item}'")
        if domain in data:
            raise UsageError(f"--data names {domain} twice ({data[domain]}, {path}): give one file per domain")
        if domain not in experts:
            raise UsageError(f"--data {item}: {domain} is not among --experts {','.join(experts)}, so nothing "
                             "would read it")
        data[domain] = path
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
    if not args.model and check_cache_dir():
        raise UsageError(check_cache_dir())
    out = args.out or os.path.join("runs", f"{args.method}-{'-'.join(experts)}-s{args.seed}")
    if why_not_out(out):
        raise UsageError(why_not_out(out))
    earlier = os.path.exists(os.path.join(out, "results.json")) or list_checkpoints(out)
    if earlier and not (args.overwrite or args.resume):
        raise UsageError(f"{out} already holds a run: pass --resume, --overwrite or another --out")
    preset = apply_flags(presets()[args.preset], args, len(experts))
    settings = Settings(experts, args.method, args.preset, preset, args.seed, out, args.overwrite, args.resume,
                        args.ckpt_every, args.model, data, args.topology, args.device, args.max_prompt_tokens,
                        args.dtype, args.grad_ckpt, args.lora_rank, args.dist_timeout,
                        {d: file_digest(path) for d, path in data.items()})
    if args.resume and why_not_resume(out, settings.recorded()):
        raise UsageError(why_not_resume(out, settings.recorded()))
    return settings


def apply_flags(preset: Preset, args, K: int) -> Preset:
    """The preset with the command line's overrides."""
    if args.steps is not None:
        preset.steps = args.steps
    elif preset.max_total_steps:
        preset.steps = min(preset.steps, preset.max_total_steps // K)
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    if args.opd_beta is not None and not (math.isfinite(args.opd_beta) and args.opd_beta >= 0):
        raise UsageError(f"--opd-beta must be a number ≥ 0, got {args.opd_beta}")
    if args.rename_trade is not None and not 0 <= args.rename_trade <= 1:
        raise UsageError(f"--rename-trade is a share of rename's clips, from 0 to 1, got {args.rename_trade}")
    if args.rl_opd_ratio is not None and not (math.isfinite(args.rl_opd_ratio) and args.rl_opd_ratio > 0):
        raise UsageError(f"--rl-opd-ratio must be a positive number (Phase I steps per Phase II step), "
                         f"got {args.rl_opd_ratio}")
    preset.lr = args.lr or preset.lr
    preset.rename_trade = preset.rename_trade if args.rename_trade is None else args.rename_trade
    if args.train_levels is not None:
        try:
            levels = tuple(sorted({int(x) for x in args.train_levels.split(",") if x.strip()}))
        except ValueError:
            levels = ()
        if not levels or not all(1 <= x <= preset.difficulty for x in levels):
            raise UsageError(f"--train-levels takes comma-separated levels from 1 to {preset.difficulty}, "
                             f"got '{args.train_levels}'")
        preset.train_levels = levels
    preset.rl_opd_ratio = args.rl_opd_ratio or preset.rl_opd_ratio
    preset.opd.beta = preset.opd.beta if args.opd_beta is None else args.opd_beta
    if args.max_new_tokens:
        preset.rl.sampling = replace(preset.rl.sampling, max_new_tokens=args.max_new_tokens)
    if args.micro_batch:
        preset.rl.micro_batch = args.micro_batch
    for flag, target, name in ((args.opd_loss, preset.opd, "opd_loss"), (args.loss_agg, preset.rl, "loss_agg"),
                               (args.advantage, preset.rl, "advantage"), (args.lr_schedule, preset, "lr_schedule")):
        if flag is not None:
            if flag not in CHOICES[name]:
                raise UsageError(f"unknown value '{flag}' (choose from {', '.join(CHOICES[name])})")
            setattr(target, name.removeprefix("opd_"), flag)
    return preset


def check_device(device: str):
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device}: not a device (cpu, cuda, cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: this code trains on cpu or cuda (cuda:N) only")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this torch ({torch.__version__}) has no CUDA, or sees no GPU; "
                         "use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} GPUs")
