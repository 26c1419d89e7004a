"""
Prompts D_d for each capability d ∈ {text, swap, image, video, rename}: built-in generators with
exact answers, and a JSONL loader for real data.

Built-in tasks (generated from a seed). `difficulty` is the knob: each example draws a level ℓ
from 1..difficulty (4 in the presets), and the level sets
  text  : arithmetic, left to right, on ℓ + 2 one-digit operands, each after the first added or
          subtracted ("7+5-3" -> 9; 4,000 problems at ℓ = 1, 32 million at ℓ = 4)
  swap  : text's problems with + and − swapped, as the prompt says ("Swap + and -, then compute
          7+5-3." -> 7−5+3 = 5): inputs that look like text's, mapped to other numbers. A problem
          has the same split in both domains, so neither trains on the other's eval
  image : coloured squares in a 6x6 grid (a 24x24 picture). ℓ = 1: "How many squares?" over 1
          to 6 of them; ℓ ≥ 2: "How many red squares?" among 2 to 6ℓ squares of four colours
  video : 4 frames of the 6x6 grid; min(ℓ, 4) squares of different colours each move half a
          cell, each a different way: "Which way did red move?" -> left | right | up | down.
          With two or more movers the question is also which square is which. The move sits
          inside the first pair of frames, which Qwen2-VL's temporal patch merges, and inside the
          square's own patches, so one vision patch sees both its before and its after (a move
          between frame pairs, or a whole-cell jump between patches, is seen by no patch alone:
          the tiny vision tower never learned those)
  rename: two of video's movers at every level (ℓ sets nothing), on a dark grey background
          instead of black, where the two squares trade names: "Which way did red move?" asks
          about the square that is not red. Video's inputs and questions bound to the other
          answer, the grey the only cue. The warm start does not teach it: π_0 answers it as
          video, right as often as it picks the other square, and RL on rename pulls against RL on
          video (the competing pair). A clip has the same split in both domains. The conflict
          knob `trade` (`--rename-trade`, default 1): the names are traded in that share of the
          clips (a hash of the clip decides, so the problems stay the same); in the others rename
          asks video's question on the grey background. At 0 the pair does not compete at all

Held-out problems are distinct (`builtin_examples` never repeats one), so an eval of n problems
has a binomial standard error of at most 50/√n points.

Train and held-out splits are disjoint by construction: an example's split is a hash of its
content, so no held-out problem is ever trained on, whatever the seed.

JSONL rows: {"prompt": str, "answer": str, "image": path?, "video": [paths]?, "verifier": str?}
with relative paths resolved against the file's folder.
"""

import hashlib
import json
import os
import random
from dataclasses import dataclass, field

import numpy as np

DOMAINS = ("text", "image", "video", "swap", "rename")
TASKS_VERSION = 3                      # bumped when a generator changes: cached π_0s are rebuilt
HELD_OUT_FRACTION = 0.2
COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 220, 40)}
CELL, GRID = 4, 6                     # 6x6 cells of 4x4 pixels: a 24x24 picture, 3x3 vision tokens
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
    level: int = 0                        # a built-in task's level (0 for JSONL rows)
    steps: str = ""                       # worked steps a warm start may teach before the answer
    # its policy.Prompt, where a run encoded it ahead (policy.prompt_of); a cache, not the example
    encoded: object = field(default=None, compare=False, repr=False)

    def target(self, steps: bool = False):
        """The response the warm start teaches: the answer, after the worked steps if `steps`."""
        return f"{self.steps if steps else ''}<answer>{self.answer}</answer>"


class DataError(ValueError):
    """Bad user data; the message names the file and line."""


def split_of(key: str) -> str:
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)
    return "heldout" if h % 1000 < HELD_OUT_FRACTION * 1000 else "train"


# -----------------------------------------------------------------------------
# generators: each returns (split key, Example)

def arithmetic(rng: random.Random, level: int) -> tuple:
    """(operands, operators) of one problem: level + 2 one-digit operands, each after the first
    added or subtracted."""
    return [rng.randint(0, 9) for _ in range(level + 2)], [rng.choice("+-") for _ in range(level + 1)]


def evaluate_left_to_right(nums: list, ops: list) -> int:
    value = nums[0]
    for op, n in zip(ops, nums[1:]):
        value = value + n if op == "+" else value - n
    return value


def running_totals(nums: list, ops: list) -> str:
    """Worked steps of a sum: each operation and the total after it ("+5=12,-3=9,"), so each step
    adds one digit to the last total instead of the answer adding up to six digits at once."""
    steps, value = [], nums[0]
    for op, n in zip(ops, nums[1:]):
        value = value + n if op == "+" else value - n
        steps.append(f"{op}{n}={value},")
    return "".join(steps)


def make_text(rng: random.Random, level: int):
    nums, ops = arithmetic(rng, level)
    expr = str(nums[0]) + "".join(op + str(n) for op, n in zip(ops, nums[1:]))
    return expr, Example("text", f"Compute {expr}.", str(evaluate_left_to_right(nums, ops)), "math",
                         steps=running_totals(nums, ops))


def make_swap(rng: random.Random, level: int):
    nums, ops = arithmetic(rng, level)
    expr = str(nums[0]) + "".join(op + str(n) for op, n in zip(ops, nums[1:]))
    swapped = ["-" if op == "+" else "+" for op in ops]
    return expr, Example("swap", f"Swap + and -, then compute {expr}.",
                         str(evaluate_left_to_right(nums, swapped)), "math", steps=running_totals(nums, swapped))


def draw_cells(cells: dict):
    """cells: {(row, col): colour name} -> a (24, 24, 3) uint8 picture on black."""
    img = np.zeros((GRID * CELL, GRID * CELL, 3), dtype=np.uint8)
    for (r, c), name in cells.items():
        img[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = COLORS[name]
    return img


def running_counts(cells: dict, colour=None) -> str:
    """Worked steps of a count: the running total after each vision token's 2x2 cells, in the
    order the language model reads the tokens ("0,1,1,3,3,3,4,4,4"), so each step adds what one
    token shows (0 to 4) instead of the last step adding up to 24 squares at once."""
    per_token = [0] * ((GRID // 2) ** 2)
    for (r, c), name in cells.items():
        if colour is None or name == colour:
            per_token[(r // 2) * (GRID // 2) + c // 2] += 1
    return ",".join(str(sum(per_token[:i + 1])) for i in range(len(per_token)))


def make_image(rng: random.Random, level: int):
    """Level 1 counts every square (1 to 6); level ≥ 2 counts the squares of one colour among
    up to 6·level coloured squares (0 to all of them)."""
    n_cells = rng.randint(1, 6) if level == 1 else rng.randint(2, 6 * level)
    positions = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n_cells)
    cells = {pos: rng.choice(list(COLORS)) for pos in positions}
    if level == 1:
        return f"{sorted(cells.items())}", Example("image", "How many squares?", str(n_cells), "math",
                                                   image=draw_cells(cells), steps=running_counts(cells))
    colour = rng.choice(list(COLORS))
    count = sum(name == colour for name in cells.values())
    return f"{sorted(cells.items())}|{colour}", Example("image", f"How many {colour} squares?", str(count), "math",
                                                        image=draw_cells(cells), steps=running_counts(cells, colour))


def make_video(rng: random.Random, level: int):
    """`level` squares (at most 4) of different colours each move half a cell, each a different
    way; the question names one of them."""
    names = rng.sample(list(COLORS), min(len(COLORS), level))
    taken, moves = set(), []
    while len(moves) < len(names):
        direction = rng.choice([d for d in DIRECTIONS if d not in {way for _, way in moves}])
        dr, dc = DIRECTIONS[direction]
        start = (rng.randrange(max(0, -dr), GRID - max(0, dr)), rng.randrange(max(0, -dc), GRID - max(0, dc)))
        entered = (start[0] + dr, start[1] + dc)           # the cell its front half enters
        if {start, entered} & taken:
            continue
        taken |= {start, entered}
        moves.append((start, direction))
    before, after = draw_cells({start: name for name, (start, _) in zip(names, moves)}), draw_cells({})
    for name, (start, direction) in zip(names, moves):
        dr, dc = DIRECTIONS[direction]
        y, x = start[0] * CELL + dr * CELL // 2, start[1] * CELL + dc * CELL // 2   # half a cell on
        after[y:y + CELL, x:x + CELL] = COLORS[name]
    asked = rng.randrange(len(names))
    video = np.stack([before, after, after, after])    # the moves inside the first temporal patch
    key = f"{sorted(zip(names, moves))}|{names[asked]}"
    return key, Example("video", f"Which way did {names[asked]} move?", moves[asked][1], "exact", video=video)


DUSK = 16                             # rename's background grey: a cue π_0 barely sees (it answers as in video)


def make_rename(rng: random.Random, level: int, trade: float = 1.0):
    """Two of video's movers at every level, on a dark grey background, where the two squares
    trade names: "Which way did red move?" asks about the square that is not red. In a share
    1 − `trade` of the clips the names are not traded (video's question on the grey)."""
    key, ex = make_video(rng, 2)
    video = np.where(ex.video.any(-1, keepdims=True), ex.video, np.uint8(DUSK))
    if int(hashlib.sha1(f"trade|{key}".encode()).hexdigest()[:8], 16) >= trade * 2 ** 32:
        return key, Example("rename", ex.prompt, ex.answer, "exact", video=video)
    asked = ex.prompt.split()[3]
    other = next(name for name, rgb in COLORS.items() if name != asked and (ex.video[0] == rgb).all(-1).any())
    return key, Example("rename", ex.prompt.replace(asked, other), ex.answer, "exact", video=video)


# the domains whose examples carry worked steps (WarmStartConfig.worked_steps may teach them)
WORKED_STEPS = ("text", "swap", "image")
GENERATORS = {"text": make_text, "image": make_image, "video": make_video, "swap": make_swap, "rename": make_rename}


def builtin_examples(domain: str, split: str, n: int, seed: int, difficulty: int = 4, levels=None,
                     rename_trade: float = 1.0) -> list:
    """n examples of `split` ("train" | "heldout"), each level drawn uniformly from `levels`
    (default 1..difficulty); `rename_trade`: rename's conflict knob (make_rename). Training
    examples are i.i.d. (a problem may recur); held-out ones are
    distinct problems, so an eval never counts one problem twice: a level with fewer problems than
    its share (video's one mover: 84 held out) gives all it has, and the rest come from the others."""
    if domain not in GENERATORS:
        raise DataError(f"unknown domain '{domain}' (built-in domains: {', '.join(DOMAINS)})")
    levels = list(levels or range(1, difficulty + 1))
    rng = random.Random(f"{domain}-{split}-{seed}-{levels}")
    make = (lambda rng, level: make_rename(rng, level, rename_trade)) if domain == "rename" else GENERATORS[domain]
    out, seen, misses = [], set(), 0
    while len(out) < n:
        level = rng.choice(levels)
        key, ex = make(rng, level)
        ex.level = level
        if split_of(key) != split:
            continue
        if split == "heldout":
            if key in seen:
                misses += 1
                if misses > 100 * n:
                    raise DataError(f"{domain}: fewer than {n} distinct held-out problems at levels {levels}")
                continue
            seen.add(key)
        out.append(ex)
    return out


# -----------------------------------------------------------------------------
# JSONL

ROW_KEYS = ("prompt", "answer", "verifier", "image", "images", "video")


def _to_8bit(im):
    """An RGB picture of 8-bit channels. PIL's convert("RGB") clips 16-bit and float pixels
    instead of scaling them (a 16-bit PNG comes out almost all white): scale those by their
    type's range first (16-bit: 0..65535; float: 0..1)."""
    from PIL import Image
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 1.0 if im.mode == "F" else 65535.0
        im = Image.fromarray(np.clip(np.round(a / top * 255), 0, 255).astype(np.uint8), mode="L")
    return np.array(im.convert("RGB"))   # a writable copy


def _load_image(value, base: str, where: str):
    """The picture at `value`, a path relative to the JSONL file's folder `base`."""
    from PIL import Image
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: an image must be a file path (a string), got {json.dumps(value)}")
    path = os.path.join(base, value)
    try:
        with Image.open(path) as im:
            return _to_8bit(im)
    except Image.DecompressionBombError as e:
        raise DataError(f"{where}: image '{path}' is too large to load ({e})") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{where}: cannot read image '{path}' ({e.__class__.__name__})") from None


def _answer(value, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
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
            if not row["prompt"].strip():
                raise DataError(f"{where}: the prompt is empty")
            unknown = sorted(set(row) - set(ROW_KEYS))
            if unknown:
                raise DataError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} (a row holds "
                                f"{', '.join(ROW_KEYS)})")
            if "images" in row:   # the Hugging Face datasets habit: a list of pictures
                if "image" in row or not isinstance(row["images"], list) or len(row["images"]) != 1:
                    raise DataError(f"{where}: 'images' must be a list of exactly one picture (or use 'image'); "
                                    "a prompt here takes one image")
                row["image"] = row["images"][0]
            verifier = row.get("verifier", "math" if domain in ("text", "swap") else "exact")
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


def load_domain(domain: str, split: str, n: int, seed: int, difficulty: int, data: dict,
                rename_trade: float = 1.0, levels: tuple = ()) -> list:
    """Built-in tasks (of `levels`, default 1..difficulty), or the user's JSONL for this domain
    (`--data DOMAIN=PATH`): its last 20% of rows are the held-out split."""
    if domain in data:
        rows = load_jsonl(data[domain], domain)
        if len(rows) < 2:
            raise DataError(f"{data[domain]}: one row cannot be split into training and held-out prompts "
                            f"(the last {HELD_OUT_FRACTION:.0%} of rows are held out): give at least two")
        cut = max(1, int(len(rows) * (1 - HELD_OUT_FRACTION)))
        return (rows[:cut] if split == "train" else rows[cut:])[:n]
    return builtin_examples(domain, split, n, seed, difficulty, levels or None, rename_trade)


def check_prompt_lengths(data: dict, count_tokens, limit: int):
    """Every prompt of every --data file (its rows were validated before π_0 loaded) within
    `limit` tokens, as `count_tokens(text, image, video)` counts them (a picture's tokens count)."""
    for domain, path in data.items():
        for ex in load_jsonl(path, domain):   # every row, whichever split it falls in
            n = count_tokens(ex.prompt[:20 * limit], ex.image, ex.video)   # a prefix first: a 10 MB prompt is refused at once
            if n <= limit < len(ex.prompt) // 20:
                n = count_tokens(ex.prompt, ex.image, ex.video)
            if n > limit:
                raise DataError(f"{ex.source}: the prompt is {'at least ' if len(ex.prompt) > 20 * limit else ''}"
                                f"{n} tokens, over the limit of {limit} (the model's context minus "
                                "--max-new-tokens, or --max-prompt-tokens)")
