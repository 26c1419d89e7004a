"""
What a run can be asked to do: the methods, the presets (dataclasses with defaults that run) and
the command line. settings.py checks what one run is asked and resolves it into `Settings`.

The methods are declared here, in METHODS; train.py maps each stage to the code that runs it.
"""

import argparse
import copy
from dataclasses import dataclass, field
from typing import Callable

import torch

from opd import OPDConfig
from policy import TinyConfig
from rlvr import RLConfig
from rollout import SamplingConfig
from tasks import DOMAINS
from warmstart import PI0_RECIPES, WarmStartConfig, response_tokens


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
    "baselines": Method(("base", "experts", "mixed", "opd", "mopd"), lambda K: (1, K + 1)),   # all but CoPD
    "all": Method(("base", "experts", "mixed", "opd", "mopd", "copd", "copd@equal"), lambda K: (K, K + 1)),
}
TOPOLOGIES = ("hub", "all-pairs")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
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
    tiny_and_warm = lambda name: dict(zip(("tiny", "warm"), copy.deepcopy(PI0_RECIPES[name])))   # warmstart.py
    # room for the longest response π_0 was taught (worked steps), so a rollout is never cut short
    sampling = lambda name: SamplingConfig(temperature=1.0, max_new_tokens=response_tokens(PI0_RECIPES[name][1]))
    smoke = Preset(steps=4, cycles=2, train_pool=200, eval_size=16, curve_eval_size=8, eval_every=2,
                   eval_samples=1, divergence_every=2, divergence_prompts=4, **tiny_and_warm("smoke"),
                   rl=RLConfig(prompts_per_step=4, group_size=4, sampling=sampling("smoke")),
                   opd=OPDConfig(prompts_per_step=4, samples_per_prompt=2, metric_rows=8))
    # T = 180 (120 with three experts): the text + image reproduction in 53 minutes on 2 cores of a
    # Zen 3 EPYC, where T = 300 took 85 (docs/performance.md)
    cpu = Preset(steps=180, max_total_steps=360, cycles=4, lr=2e-4,
                 eval_every=50, eval_size=1000, curve_eval_size=200, **tiny_and_warm("cpu"),
                 rl=RLConfig(prompts_per_step=16, group_size=8, sampling=sampling("cpu")),
                 opd=OPDConfig(prompts_per_step=8, samples_per_prompt=8))
    gpu = Preset(steps=200, cycles=8, eval_size=1000, curve_eval_size=200, **tiny_and_warm("gpu"),
                 rl=RLConfig(prompts_per_step=64, group_size=8, micro_batch=512, sampling=sampling("gpu")),
                 opd=OPDConfig(prompts_per_step=32, samples_per_prompt=8))
    return {"smoke": smoke, "cpu": cpu, "gpu": gpu}


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""


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
    ap.add_argument("--worked-steps", default=None, metavar="D,D",
                    help="the tiny π_0 taught to write worked steps before its answers in these domains: text, "
                         "swap (running totals), image (a running count over the picture's vision tokens); none: no domain "
                         "(default: the preset's, none)")
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
