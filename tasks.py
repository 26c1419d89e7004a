"""
Prompts D_d for each capability d ∈ {text, image, video}: built-in generators with exact
answers, and a JSONL loader for real data.

Built-in tasks (generated from a seed). `difficulty` is the knob: each example draws a level
from 1..difficulty, and the level sets
  text  : left-to-right arithmetic on level + 1 one-digit operands (level 1 adds): "7+5-3" -> 9
  image : 1 to level + 2 coloured cells in a 4x4 grid (a 16x16 picture): "How many squares?" -> 3
  video : 4 frames; one coloured square moves one cell between frames 2 and 3 while level − 1
          others stay put: "Which way did red move?" -> left | right | up | down

Train and held-out splits are disjoint by construction: an example's split is a hash of its
content, so no held-out problem is ever trained on, whatever the seed.

JSONL rows: {"prompt": str, "answer": str, "image": path?, "video": [paths]?, "verifier": str?}
with relative paths resolved against the file's folder.
"""

import hashlib
import json
import os
import random
from dataclasses import dataclass

import numpy as np

DOMAINS = ("text", "image", "video")
HELD_OUT_FRACTION = 0.2
COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 220, 40)}
CELL, GRID = 4, 4                     # 4x4 cells of 4x4 pixels: a 16x16 picture
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}


@dataclass
class Example:
    domain: str
    prompt: str
    answer: str
    verifier: str = "exact"               # "math" | "exact" | "choice" (verifiers.py)
    image: np.ndarray | None = None       # (H, W, 3) uint8
    video: np.ndarray | None = None       # (T, H, W, 3) uint8
    source: str = ""                      # file:line of a JSONL row (for error messages)

    def target(self):
        """The response the warm start teaches."""
        return f"<answer>{self.answer}</answer>"


class DataError(ValueError):
    """Bad user data; the message names the file and line."""


def split_of(key: str) -> str:
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)
    return "heldout" if h % 1000 < HELD_OUT_FRACTION * 1000 else "train"


# -----------------------------------------------------------------------------
# generators: each returns (split key, Example)

def make_text(rng: random.Random, level: int):
    nums = [rng.randint(0, 9) for _ in range(level + 1)]
    ops = [rng.choice("+-") if level > 1 else "+" for _ in range(level)]   # level 1: one addition
    expr, value = str(nums[0]), nums[0]
    for op, n in zip(ops, nums[1:]):
        expr += op + str(n)
        value = value + n if op == "+" else value - n
    return expr, Example("text", f"Compute {expr}.", str(value), "math")


def draw_cells(cells: dict):
    """cells: {(row, col): colour name} -> a (16, 16, 3) uint8 picture on black."""
    img = np.zeros((GRID * CELL, GRID * CELL, 3), dtype=np.uint8)
    for (r, c), name in cells.items():
        img[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = COLORS[name]
    return img


def make_image(rng: random.Random, level: int):
    n_cells = rng.randint(1, level + 2)
    positions = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n_cells)
    cells = {pos: rng.choice(list(COLORS)) for pos in positions}
    key = f"{sorted(cells.items())}"
    return key, Example("image", "How many squares?", str(n_cells), "math", image=draw_cells(cells))


def make_video(rng: random.Random, level: int):
    names = rng.sample(list(COLORS), min(len(COLORS), level))
    direction = rng.choice(list(DIRECTIONS))
    dr, dc = DIRECTIONS[direction]
    rows = range(max(0, -dr), GRID - max(0, dr))
    cols = range(max(0, -dc), GRID - max(0, dc))
    start = (rng.choice(rows), rng.choice(cols))
    end = (start[0] + dr, start[1] + dc)
    free = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in (start, end)]
    still = dict(zip(rng.sample(free, len(names) - 1), names[1:]))
    mover = names[0]
    before, after = draw_cells({**still, start: mover}), draw_cells({**still, end: mover})
    video = np.stack([before, before, after, after])    # the move lands between temporal patches
    key = f"{sorted(still.items())}|{mover}|{start}|{direction}"
    return key, Example("video", f"Which way did {mover} move?", direction, "exact", video=video)


GENERATORS = {"text": make_text, "image": make_image, "video": make_video}


def builtin_examples(domain: str, split: str, n: int, seed: int, difficulty: int = 2) -> list:
    """n i.i.d. examples of `split` ("train" | "heldout"). Both splits follow the same level
    mix, so a level with few distinct problems (one-step arithmetic has 200) repeats."""
    if domain not in GENERATORS:
        raise DataError(f"unknown domain '{domain}' (built-in domains: {', '.join(DOMAINS)})")
    rng = random.Random(f"{domain}-{split}-{seed}-{difficulty}")
    out = []
    while len(out) < n:
        # each example draws its level from 1..difficulty: easy ones teach the format, hard ones
        # leave room for RL
        key, ex = GENERATORS[domain](rng, rng.randint(1, difficulty))
        if split_of(key) == split:
            out.append(ex)
    return out


# -----------------------------------------------------------------------------
# JSONL

def _load_image(value, base: str, where: str):
    """The picture at `value`, a path relative to the JSONL file's folder `base`."""
    from PIL import Image
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: an image must be a file path (a string), got {json.dumps(value)}")
    path = os.path.join(base, value)
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))   # a writable copy
    except Image.DecompressionBombError as e:
        raise DataError(f"{where}: image '{path}' is too large to load ({e})") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{where}: cannot read image '{path}' ({e.__class__.__name__})") from None


def _answer(value, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or value == "":
        raise DataError(f"{where}: 'answer' must be a non-empty string or a number, got {json.dumps(value)}")
    return str(value)


def load_jsonl(path: str, domain: str) -> list:
    """Every row validated up front, so a bad row fails before any training starts."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    base = os.path.dirname(os.path.abspath(path))
    examples = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or "answer" not in row:
                raise DataError(f"{where}: a row needs a string 'prompt' and an 'answer'")
            verifier = row.get("verifier", "math" if domain == "text" else "exact")
            if verifier not in ("math", "exact", "choice"):
                raise DataError(f"{where}: unknown verifier '{verifier}' (math, exact or choice)")
            ex = Example(domain, row["prompt"], _answer(row["answer"], where), verifier, source=where)
            if "image" in row:
                ex.image = _load_image(row["image"], base, where)
            if "video" in row:
                paths = row["video"] if isinstance(row["video"], list) else [row["video"]]
                if not paths:
                    raise DataError(f"{where}: 'video' needs at least one frame")
                frames = [_load_image(p, base, where) for p in paths]
                if len({fr.shape for fr in frames}) != 1:
                    raise DataError(f"{where}: video frames differ in size")
                ex.video = np.stack(frames)
            examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples


def load_domain(domain: str, split: str, n: int, seed: int, difficulty: int, data: dict) -> list:
    """Built-in tasks, or the user's JSONL for this domain (`--data DOMAIN=PATH`): its last
    20% of rows are the held-out split."""
    if domain in data:
        rows = load_jsonl(data[domain], domain)
        if len(rows) < 2:
            raise DataError(f"{data[domain]}: one row cannot be split into training and held-out prompts "
                            f"(the last {HELD_OUT_FRACTION:.0%} of rows are held out): give at least two")
        cut = max(1, int(len(rows) * (1 - HELD_OUT_FRACTION)))
        return (rows[:cut] if split == "train" else rows[cut:])[:n]
    return builtin_examples(domain, split, n, seed, difficulty)
