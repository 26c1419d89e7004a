"""
One run's settings, resolved and checked: `validate` turns the command line (config.parse_args)
and its preset into `Settings`, a frozen value every other file reads, and refuses bad input
before anything is written (one line, UsageError: exit code 2).
"""

import math
import os
import re
from dataclasses import asdict, dataclass, field, replace

import torch

from checkpoint import file_digest, list_checkpoints, why_not_out, why_not_resume
from config import CHOICES, DTYPES, METHODS, TOPOLOGIES, Preset, UsageError, presets
from policy import encode_prompt
from tasks import DOMAINS, check_prompt_lengths
from warmstart import check_cache_dir, parse_worked_steps, response_tokens

HUB_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")   # owner/name on the Hugging Face Hub


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
                "--max-new-tokens": p.rl.sampling.max_new_tokens, "--dtype": self.dtype, "--lora-rank": self.lora_rank,
                "--worked-steps": ",".join(p.warm.worked_steps)}


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


def steps_of(preset: Preset, K: int, steps: int | None = None) -> int:
    """T, the GRPO steps of one expert, for K experts: `--steps` if given, else the preset's,
    capped so that K·T stays within its `max_total_steps`."""
    if steps is not None:
        return steps
    return min(preset.steps, preset.max_total_steps // K) if preset.max_total_steps else preset.steps


def apply_flags(preset: Preset, args, K: int) -> Preset:
    """The preset with the command line's overrides."""
    preset.steps = steps_of(preset, K, args.steps)
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
    if args.worked_steps is not None:
        if args.model:
            raise UsageError(f"--worked-steps {args.worked_steps} changes the tiny π_0's warm start; "
                             f"--model {args.model} has none")
        try:
            preset.warm = replace(preset.warm, worked_steps=parse_worked_steps(args.worked_steps))
        except ValueError as e:
            raise UsageError(str(e)) from None
    # --worked-steps may have changed what π_0 writes, and so the room its responses need
    preset.rl.sampling = replace(preset.rl.sampling,
                                 max_new_tokens=args.max_new_tokens or response_tokens(preset.warm))
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


def check_context(settings: Settings, model, proc):
    """With the model loaded: a response fits its context, and so does every --data prompt
    beside it (its picture's or video's tokens counted; DataError names the longest)."""
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    new_tokens = settings.preset.rl.sampling.max_new_tokens
    if context and new_tokens >= context:
        raise UsageError(f"--max-new-tokens {new_tokens}: the model's context holds {context} tokens, "
                         "prompt and response together")
    limit = settings.max_prompt_tokens or (context - new_tokens if context else None)
    if limit:
        check_prompt_lengths(settings.data, lambda text, image, video: prompt_tokens(proc, text, image, video), limit)


def prompt_tokens(proc, text: str, image=None, video=None) -> int:
    """The tokens a prompt takes in the model's context, its picture's or video's included."""
    if image is None and video is None:
        return len(proc.tokenizer(text, add_special_tokens=False)["input_ids"])
    return len(encode_prompt(proc, text, image, video).ids)
