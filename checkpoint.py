"""
Checkpoints of a whole run, so a killed run resumes exactly where it was.

A checkpoint is one file `OUT/ckpt-NNNNN.pt` holding everything the run needs to go on as if
it had never stopped: the weights and optimizer state of the loop in progress, the finished
models later methods need (the experts), the RNG states, the loop's step, which stages are
done, the results, curves and divergence measurements so far, and how many lines of
metrics.jsonl they account for, and the settings that define the run (a resume with other
settings is refused). It is written to a temporary name and renamed only when
complete (a rename is atomic), and only the newest two are kept.

Also what a run folder may hold before a run starts (`why_not_out`, `why_not_resume`: config.py
turns a reason into a one-line error) and the lock that keeps one run per folder.
"""

import fcntl
import glob
import hashlib
import json
import os
import random
import shutil

import torch

KEEP = 2


def rng_state(run_rng: random.Random) -> dict:
    return {"run": run_rng.getstate(), "python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(run_rng: random.Random, state: dict):
    run_rng.setstate(state["run"])
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: str, snapshot: dict) -> str:
    """Write ckpt-<next>.pt atomically; drop all but the newest KEEP. Returns its path."""
    existing = list_checkpoints(out)
    number = int(os.path.basename(existing[-1])[5:10]) + 1 if existing else 1
    path = os.path.join(out, f"ckpt-{number:05d}.pt")
    tmp = path + ".tmp"
    try:
        torch.save(snapshot, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    for old in list_checkpoints(out)[:-KEEP]:
        os.remove(old)
    return path


def list_checkpoints(out: str) -> list:
    """Complete checkpoints, oldest first (a half-written one still has its .tmp name)."""
    return sorted(glob.glob(os.path.join(out, "ckpt-[0-9][0-9][0-9][0-9][0-9].pt")))


def _read(path: str, mmap: bool = False):
    return torch.load(path, weights_only=False, mmap=mmap)


def load_latest(out: str):
    """(path, snapshot, unreadable paths) of the newest checkpoint that loads: a newest one that
    is truncated or corrupt (a disk filled up, a copy cut short) gives way to the one before it.
    (None, None, unreadable) when none loads."""
    unreadable = []
    for path in reversed(list_checkpoints(out)):
        try:
            return path, _read(path), unreadable
        except Exception:   # torch raises RuntimeError, EOFError or pickle's errors on a damaged file
            unreadable.append(path)
    return None, None, unreadable


def recorded(out: str, key: str):
    """`key` of the newest readable checkpoint ("settings": the settings it was written under;
    "metrics_lines": the lines of metrics.jsonl it accounts for), cheaply (tensors are mapped,
    not read); None when there is none, or it predates the key."""
    for path in reversed(list_checkpoints(out)):
        try:
            return _read(path, mmap=True).get(key)
        except Exception:
            continue
    return None


# -----------------------------------------------------------------------------
# what a folder may hold before a run starts: each check returns why not, or None

def clear_run(out: str):
    """Delete an earlier run's checkpoints, results and CoPD branches from OUT (for --overwrite);
    its metrics.jsonl is rewritten by the new run."""
    for old in list_checkpoints(out) + [os.path.join(out, f) for f in ("results.json", "results.md", "curves.png")]:
        if os.path.exists(old):
            os.remove(old)
    for old in glob.glob(os.path.join(out, "*-branches")):
        shutil.rmtree(old, ignore_errors=True)


def why_not_out(out: str) -> str | None:
    """--out must be a folder this process can write, and not in use (noticed before π_0 is built)."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out}: a file, not a folder"
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not (os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)):
        return f"--out {out}: cannot write in {parent}"
    holder = folder_holder(out)
    if holder is not None:
        return f"{out} is in use by process {holder}: one folder holds one run (wait for it, or pass another --out)"
    return None


def file_digest(path: str) -> str | None:
    """The first 16 hex digits of a file's SHA-256 (None if it cannot be read: the data check names it)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()[:16]
    except OSError:
        return None


# flags newer than some recorded runs, with the value those runs ran under
FLAGS_ADDED_SINCE = {"--worked-steps": ""}


def why_not_resume(out: str, now: dict) -> str | None:
    """--resume continues the run in `out` under its own settings `now` (compared with its newest
    checkpoint's, or else its log's first line; a --data file by its contents), never replaces a
    finished run's results, and needs the log the checkpoint accounts for."""
    before = recorded(out, "settings") or logged_settings(out)
    before = before and {**FLAGS_ADDED_SINCE, **before}
    differ = [f"{flag} {before.get(flag)} (now {value})" for flag, value in now.items()
              if before and before.get(flag) != value]
    if differ:
        return (f"--resume: {out} holds a run with other settings: {'; '.join(differ)}. Resume with its settings, "
                "or start over with --overwrite")
    if os.path.exists(os.path.join(out, "results.json")):
        return f"--resume: {out} holds a finished run (results.json): nothing to resume; --overwrite runs it again"
    accounted = recorded(out, "metrics_lines")
    if accounted:
        log = os.path.join(out, "metrics.jsonl")
        try:
            with open(log, "rb") as f:
                lines = sum(1 for _ in f)
        except OSError:
            lines = None
        if lines is None or lines < accounted:
            state = "is missing" if lines is None else f"holds {lines} lines"
            return (f"--resume: {log} {state}, but the newest checkpoint accounts for {accounted}: the log was "
                    "deleted or cut short, and a resumed run's compute and curves would be wrong. Restore the log, "
                    "or start over with --overwrite")
    return None


def logged_settings(out: str):
    """The settings in the first line of OUT/metrics.jsonl (the run's config row), or None."""
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return json.loads(f.readline()).get("recorded")
    except (OSError, ValueError, AttributeError):
        return None


# -----------------------------------------------------------------------------
# one folder, one run: OUT/.lock, an flock the kernel drops when its process dies (so a killed
# run never blocks a later one)

LOCK = ".lock"


class FolderInUse(Exception):
    """Another live process runs in this folder."""


def folder_holder(out: str):
    """The pid of a live process that holds `out` (-1 if it wrote none), or None. Reads only."""
    try:
        f = open(os.path.join(out, LOCK))
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = f.read().strip()
            return int(pid) if pid.isdigit() else -1
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def hold_folder(out: str):
    """Take `out` for this process's lifetime: returns the open lock file (keep it open), or
    raises FolderInUse naming the process that holds it."""
    f = open(os.path.join(out, LOCK), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise FolderInUse(f"{out} is in use by process {pid}: one folder holds one run (wait for it, "
                          "or pass another --out)") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f
