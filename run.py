"""
The state one invocation of train.py carries from its first step to its last: the prompt pools,
the evaluations, the metrics log, the non-finite guard, the finished stages, and the
checkpoints that let a killed run resume exactly (checkpoint.py writes the files).

train.py's loops call, per step: `set_lr` → their update → `log` → `check_finite` → (every
few steps) `evaluate` → `end_of_step` (which checkpoints every --ckpt-every steps).
"""

import errno
import json
import math
import os
import platform
import random
import sys
import time

import torch
from tqdm import tqdm

from checkpoint import load_latest, rng_state, save_checkpoint, set_rng_state
from copd import branch_seed
from evaluate import accuracy
from memory import clone_policy
from optim import adamw, learning_rate, set_lr
from policy import encode_prompt
from tasks import load_domain
from warmstart import pi0_of

MAX_SKIPPED_IN_A_ROW = 5


class TrainingError(Exception):
    """Training cannot go on (non-finite losses, a full disk): printed as one line, exit code 3."""


def unwritable(out: str, what: str, error: Exception) -> str:
    """One line for a write into OUT that failed, a full disk above all (torch's writer says
    so as a RuntimeError, the rest as OSError ENOSPC)."""
    text = str(error)
    full = getattr(error, "errno", None) == errno.ENOSPC or "write failed" in text or "failed writing" in text
    reason = "no space left on its device" if full else (text.strip().splitlines() or [type(error).__name__])[0][:200]
    return f"could not write {what} in {out}: {reason}"


def machine(device: str) -> str:
    """What a run's numbers were computed on. The float order, and so the exact numbers, differ
    between CPUs (an AVX-512 and an AVX2 build of the same run part ways) and between versions."""
    import transformers
    where = (torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda"
             else f"{platform.machine()} CPU, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thread" + "s" * (torch.get_num_threads() > 1))
    return f"{where}; torch {torch.__version__}, transformers {transformers.__version__}"


class Run:
    """Everything one invocation shares: π_0, data, the log, and the results so far.
    `writer`: under torchrun every rank keeps the same results and rank 0 alone writes them."""

    def __init__(self, settings, model0, proc, writer: bool = True):
        self.settings, self.preset = settings, settings.preset
        self.model0, self.proc, self.writer = model0, proc, writer
        self.domains = list(settings.experts)
        self.rng = random.Random(settings.seed)
        preset, seed, data = settings.preset, settings.seed, settings.data
        self.train_pool = {d: load_domain(d, "train", preset.train_pool, seed, preset.difficulty, data,
                                          preset.rename_trade, preset.train_levels) for d in self.domains}
        self.heldout = {d: load_domain(d, "heldout", preset.eval_size, seed, preset.difficulty, data,
                                       preset.rename_trade) for d in self.domains}
        # built-in prompts encoded once, for every step and eval that draws them (policy.prompt_of);
        # a user's pictures could take gigabytes at once
        for d in self.domains:
            if d not in data:
                for ex in self.train_pool[d] + self.heldout[d]:
                    ex.encoded = encode_prompt(proc, ex.prompt, ex.image, ex.video)
        self.results, self.curves, self.divergence = {}, {}, {}
        self.skipped_in_a_row = {}
        self.completed, self.models = [], {}     # finished stages; finished models later stages need
        self.resume, self.lines = None, 0
        self.t0 = self.stage_t0 = time.time()
        metrics = os.path.join(settings.out, "metrics.jsonl")
        if settings.resume:
            self._load_checkpoint(metrics)
        self.log_file = open(metrics if writer else os.devnull, "a" if self.resume else "w")
        # a resumed run that moved to another machine says so: its numbers after the move are
        # that machine's float order
        here = machine(settings.device)
        if self.results.get("_machine", [None])[-1] != here:
            self.results.setdefault("_machine", []).append(here)
        self.results["_pi0"] = pi0_of(settings)

    # -- prompts

    def prompts(self, domain: str, n: int) -> list:
        return [self.rng.choice(self.train_pool[domain]) for _ in range(n)]

    def mixed_prompts(self, n: int) -> list:
        """An equal share of each domain (the union D_1 ∪ … ∪ D_K)."""
        per = [n // len(self.domains) + (i < n % len(self.domains)) for i in range(len(self.domains))]
        return [ex for d, k in zip(self.domains, per) for ex in self.prompts(d, k)]

    # -- the log, the guard, the learning rate

    def progress(self, iterable, **bar):
        """A progress bar over a loop's steps, on a terminal only (disable=None: not when the
        output goes to a file) and under torchrun on rank 0 only. `record` prints the line
        that stays."""
        return tqdm(iterable, leave=False, disable=None if self.writer else True, **bar)

    def log(self, **row):
        row["time"] = round(time.time() - self.t0, 2)
        try:
            self.log_file.write(json.dumps(row) + "\n")
            self.log_file.flush()
        except OSError as e:
            raise TrainingError(unwritable(self.settings.out, "metrics.jsonl", e) + "; the last complete "
                                "checkpoint is kept: free space, then --resume") from None
        self.lines += 1

    def check_finite(self, model: str, step: int, stats: dict):
        """A step with a non-finite loss or gradient is skipped by the update (rlvr.update);
        MAX_SKIPPED_IN_A_ROW of them in a row mean training has diverged: stop."""
        skipped = bool(stats.get("skipped"))
        self.skipped_in_a_row[model] = self.skipped_in_a_row.get(model, 0) + 1 if skipped else 0
        if self.skipped_in_a_row[model] >= MAX_SKIPPED_IN_A_ROW:
            raise TrainingError(f"{model}: {MAX_SKIPPED_IN_A_ROW} steps in a row had a non-finite "
                                f"loss or gradient (last at step {step}); stopping")

    def optimizer(self, model):
        return adamw(model, self.preset.lr)

    def set_lr(self, opts, step: int, total: int) -> float:
        """Every loop (an expert, mixed, OPD, MOPD, CoPD's branches) decays over its own `total`
        updates. A function of the step, not a scheduler's state, so a resumed run agrees."""
        lr = learning_rate(self.preset.lr, step, total, self.preset.lr_schedule, self.preset.min_lr_frac)
        set_lr(opts, lr)
        return lr

    # -- evaluation

    def evaluate(self, models: dict, step: int, final: bool = False, branches=None) -> dict:
        """Held-out accuracy of each {name: model} on every domain: logged, kept for the curves,
        returned as {name: {domain: {"greedy", "sampled"?}}}. The final eval uses the larger set
        and sampled responses too. `branches` (copd.Branches or parallel.RankBranches) decides
        which process measures which model; every process learns every result."""
        def measure(name, model):
            size = self.preset.eval_size if final else self.preset.curve_eval_size
            # its own seed: the same samples whichever process evaluates
            torch.manual_seed(branch_seed(f"{self.settings.seed}:eval:{step}:{final}", name))
            return {d: accuracy(model, self.proc, self.heldout[d][:size], self.preset.rl.sampling,
                                self.preset.eval_samples if final else 0)
                    for d in self.domains}
        results = branches.measure(measure, models) if branches else {n: measure(n, m) for n, m in models.items()}
        for name, accs in results.items():
            self.log(kind="eval", model=name, step=step, final=final,
                     accuracy={d: {k: v for k, v in a.items() if k != "right"} for d, a in accs.items()})
            if not final:   # the final eval uses a larger set: it would put a jump at the curve's end
                self.curves.setdefault(name, []).append((step, {d: a["greedy"] for d, a in accs.items()}))
        return results

    def record(self, method: str, accs: dict, steps: int = 0):
        """A method's final accuracies into the results table, and one line that stays in the
        log: the stage, its steps, its time and the accuracies."""
        if self.writer:
            took = time.time() - self.stage_t0   # since the previous stage ended
            print(f"[{(time.time() - self.t0) / 60:5.1f} min] {method}: {steps} steps, {took:.0f} s; held-out greedy "
                  + ", ".join(f"{d} {100 * a['greedy']:.1f}%" for d, a in accs.items()), flush=True)
        row = {d: round(a["greedy"], 4) for d, a in accs.items()}
        row["average"] = round(sum(row.values()) / len(row), 4)
        self.results[method] = row
        self.results.setdefault("_wall_s", {})[method] = round(time.time() - self.stage_t0, 1)
        # the binomial standard error of each accuracy, over the distinct problems evaluated
        problems = {d: len(self.heldout[d][:self.preset.eval_size]) for d in accs}
        self.results["_eval_problems"] = problems
        self.results.setdefault("_stderr", {})[method] = {
            d: round(math.sqrt(a["greedy"] * (1 - a["greedy"]) / problems[d]), 4) for d, a in accs.items()}
        if all("right" in a for a in accs.values()):   # per problem: paired differences between models
            self.results.setdefault("_right", {})[method] = {d: a["right"] for d, a in accs.items()}
        if any("sampled" in a for a in accs.values()):
            self.results.setdefault("_sampled", {})[method] = {d: round(a["sampled"], 4) for d, a in accs.items()}

    # -- stages, checkpoints and resuming

    def pending(self, stage: str) -> bool:
        return stage not in self.completed

    def finish(self, stage: str, **keep):
        """Mark a stage finished, keeping the models that later stages need."""
        self.models.update(keep)
        self.completed.append(stage)
        self.stage_t0 = time.time()

    def begin_loop(self, loop: str, models: dict, optimizers: dict) -> int:
        """The step a training loop starts after: 0, or where the checkpoint being resumed left
        it (its weights, optimizer state and RNG states are loaded here)."""
        snap = self.resume
        if snap is None or snap["loop"] != loop:
            return 0
        for name, model in models.items():
            model.load_state_dict(snap["loop_models"][name])
        for name, opt in optimizers.items():
            opt.load_state_dict(snap["loop_optimizers"][name])
        set_rng_state(self.rng, snap["rng"])
        self.resume = None
        return snap["step"]

    def end_of_step(self, loop: str, step: int, models: dict, optimizers: dict, where: str = ""):
        """Checkpoint every --ckpt-every steps of any loop."""
        every = self.settings.ckpt_every
        if not every or step % every:
            return
        try:
            self._save(loop, step, models, optimizers, where)
        except (OSError, RuntimeError) as e:   # the half-written file is gone; the one before it stays
            raise TrainingError(unwritable(self.settings.out, "a checkpoint", e) + "; the last complete "
                                "checkpoint is kept: free space, then --resume") from None

    def _save(self, loop: str, step: int, models: dict, optimizers: dict, where: str):
        save_checkpoint(self.settings.out, {
            "loop": loop, "step": step, "where": where or f"{loop} step {step}",
            "completed": list(self.completed), "models": {k: m.state_dict() for k, m in self.models.items()},
            "loop_models": {k: m.state_dict() for k, m in models.items()},
            "loop_optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "rng": rng_state(self.rng), "results": self.results, "curves": self.curves,
            "divergence": self.divergence, "skipped": self.skipped_in_a_row, "metrics_lines": self.lines,
            "settings": self.settings.recorded(), "stage_seconds": time.time() - self.stage_t0})

    def _load_checkpoint(self, metrics: str):
        path, snap, unreadable = load_latest(self.settings.out)
        for bad in unreadable:   # renamed, so the run's own checkpointing never keeps it over a good one
            print(f"warning: {bad} is unreadable (truncated or corrupt); kept as {bad}.unreadable", file=sys.stderr)
            if self.writer:
                os.replace(bad, bad + ".unreadable")
        if snap is None:
            print(f"no checkpoint in {self.settings.out}: starting from the beginning")
            return
        print(f"resuming from {path}, {snap['where']}")
        self.resume = snap
        self.completed, self.results = snap["completed"], snap["results"]
        self.curves, self.divergence = snap["curves"], snap["divergence"]
        self.skipped_in_a_row = snap["skipped"]
        for name, state in snap["models"].items():
            self.models[name] = clone_policy(self.model0)
            self.models[name].load_state_dict(state)
        self.lines = snap["metrics_lines"]
        # the interrupted stage's wall time goes on from its checkpoint (the time after it is redone)
        self.stage_t0 = time.time() - snap.get("stage_seconds", 0.0)
        with open(metrics) as f:   # drop what was logged after the checkpoint
            kept = f.readlines()[:self.lines]
        with open(metrics, "w") as f:
            f.writelines(kept)
