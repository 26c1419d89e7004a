import json
import re

import numpy as np
import pytest

from tasks import DataError, builtin_examples, load_domain, load_jsonl, split_of
from verifiers import is_correct


@pytest.mark.parametrize("domain", ["text", "image", "video", "swap", "rename"])
def test_splits_are_disjoint_and_seeded(domain):
    train = builtin_examples(domain, "train", 300, seed=0)
    held = builtin_examples(domain, "heldout", 100, seed=0)
    key = lambda e: (e.prompt, e.answer, None if e.image is None else e.image.tobytes(),
                     None if e.video is None else e.video.tobytes())
    assert not {key(e) for e in train} & {key(e) for e in held}
    again = builtin_examples(domain, "heldout", 100, seed=0)
    assert [key(e) for e in again] == [key(e) for e in held]


def test_builtin_answers_are_right():
    from tasks import CELL, GRID
    for ex in builtin_examples("text", "train", 50, 1):
        assert is_correct(str(eval(ex.prompt[len("Compute "):-1])), ex.answer, ex.verifier)
    for ex in builtin_examples("swap", "train", 50, 1):
        expr = ex.prompt[len("Swap + and -, then compute "):-1]
        swapped = expr.replace("+", "p").replace("-", "+").replace("p", "-")
        assert is_correct(str(eval(swapped)), ex.answer, ex.verifier)
    from tasks import COLORS
    for ex in builtin_examples("image", "train", 50, 1):
        assert ex.image.shape == (GRID * CELL, GRID * CELL, 3)
        cells = ex.image[::CELL, ::CELL].reshape(-1, 3)                 # one pixel per cell
        colour = ex.prompt.split()[2]                                   # "How many red squares?"
        wanted = (lambda c: c.any()) if colour == "squares?" else (lambda c: tuple(c) == COLORS[colour])
        assert sum(bool(wanted(c)) for c in cells) == int(ex.answer)
    moves = {(0, -1): "left", (0, 1): "right", (-1, 0): "up", (1, 0): "down"}
    for ex in builtin_examples("video", "train", 50, 1):
        assert ex.video.shape == (4, GRID * CELL, GRID * CELL, 3)
        assert (ex.video[1] == ex.video[2]).all() and (ex.video[2] == ex.video[3]).all()   # moved once, early
        mover = COLORS[ex.prompt.split()[3]]
        centre = lambda frame: np.argwhere((frame == mover).all(-1)).mean(0)
        shift = np.round((centre(ex.video[1]) - centre(ex.video[0])) / (CELL / 2)).astype(int)
        assert moves[tuple(shift)] == ex.answer                                        # half a cell that way


def test_video_levels_count_the_movers_and_each_moves_its_own_way():
    """Level ℓ has ℓ movers, in different directions, so a model that sees motion but not which
    square made it is right 1/ℓ of the time."""
    from tasks import COLORS
    for level in (1, 2, 3, 4):
        for ex in builtin_examples("video", "train", 30, 0, levels=(level,)):
            moved = [name for name, rgb in COLORS.items()
                     if (ex.video[0] == rgb).all(-1).any() and not ((ex.video[0] == rgb).all(-1) == (ex.video[1] == rgb).all(-1)).all()]
            assert len(moved) == level
            ways = set()
            for name in moved:
                at = lambda f: np.argwhere((f == COLORS[name]).all(-1)).mean(0)
                ways.add(tuple(np.sign(np.round(at(ex.video[1]) - at(ex.video[0]))).astype(int)))
            assert len(ways) == level


@pytest.mark.parametrize("domain, at_least", [("text", 2000), ("swap", 2000), ("image", 2000), ("video", 2000),
                                                    ("rename", 2000)])
def test_every_domain_holds_out_thousands_of_distinct_problems(domain, at_least):
    """The final eval draws 1,000 distinct held-out problems: a standard error of ≤ 1.6 points."""
    import random
    from tasks import GENERATORS
    rng = random.Random(0)
    keys = {GENERATORS[domain](rng, rng.randint(1, 4))[0] for _ in range(60000)}
    assert sum(split_of(k) == "heldout" for k in keys) >= at_least
    held = builtin_examples(domain, "heldout", 1000, seed=0)
    key = lambda e: (e.prompt, e.answer, None if e.image is None else e.image.tobytes(),
                     None if e.video is None else e.video.tobytes())
    assert len({key(e) for e in held}) == 1000


def test_text_and_swap_share_their_splits():
    """A held-out expression is held out in both domains: neither trains on the other's eval."""
    text = {e.prompt[len("Compute "):-1] for e in builtin_examples("text", "heldout", 300, 0)}
    swap_train = {e.prompt[len("Swap + and -, then compute "):-1] for e in builtin_examples("swap", "train", 3000, 0)}
    assert text and not text & swap_train


def test_rename_is_video_with_two_squares_that_trade_names_on_a_grey_background():
    """Two movers; "Which way did red move?" asks about the square that is not red, and the
    answer is that square's move; the background (the one cue) is DUSK grey, never black."""
    from tasks import COLORS, DUSK
    for ex in builtin_examples("rename", "train", 100, 0):
        frames = ex.video.reshape(4, -1, 3)
        assert not (frames == 0).all(-1).any() and (frames == DUSK).all(-1).any()
        named = ex.prompt.split()[3]
        moved = [rgb for rgb in COLORS.values() if (ex.video[0] == rgb).all(-1).any()]
        assert len(moved) == 2 and COLORS[named] in moved
        other = next(rgb for rgb in moved if rgb != COLORS[named])
        at = lambda f: np.argwhere((f == other).all(-1)).mean(0)
        way = tuple(np.sign(np.round(at(ex.video[1]) - at(ex.video[0]))).astype(int))
        assert {(0, -1): "left", (0, 1): "right", (-1, 0): "up", (1, 0): "down"}[way] == ex.answer


def test_rename_trade_is_the_share_of_clips_whose_names_trade():
    """The conflict knob: at 1 every clip trades names (today's rename), at 0 none does (video's
    answer on the grey), at 0.5 about half; the clips themselves never change, and a clip that
    trades at a share trades at every larger one."""
    from tasks import DUSK
    traded = {}
    for p in (0.0, 0.5, 1.0):
        exs = builtin_examples("rename", "train", 400, 0, rename_trade=p)
        assert all((ex.video.reshape(4, -1, 3) == DUSK).all(-1).any() for ex in exs)
        traded[p] = [ex.prompt for ex in exs]
    video_like = builtin_examples("rename", "train", 400, 0, rename_trade=0.0)
    same = [a == b for a, b in zip(traded[0.5], traded[0.0])]
    assert not any(a == b for a, b in zip(traded[1.0], traded[0.0]))   # every name traded at 1
    assert 0.4 < 1 - sum(same) / len(same) < 0.6
    assert all(a == b or c == a for a, b, c in zip(traded[0.5], traded[0.0], traded[1.0]))
    assert [ex.answer for ex in video_like] == [ex.answer for ex in builtin_examples("rename", "train", 400, 0)]
    assert traded[1.0] == [ex.prompt for ex in builtin_examples("rename", "train", 400, 0)]   # the default


def test_video_and_rename_share_their_splits():
    """The same clip (and asked square) is held out in both domains."""
    from tasks import make_rename, make_video
    import random
    for i in range(200):
        assert make_video(random.Random(i), 2)[0] == make_rename(random.Random(i), 3)[0]


def test_difficulty_changes_the_problems():
    easy = {e.prompt for e in builtin_examples("text", "train", 100, 0, difficulty=1)}
    hard = [e.prompt for e in builtin_examples("text", "train", 100, 0, difficulty=3)]
    assert {p.count("+") + p.count("-") for p in easy} == {2}          # three operands
    assert max(p.count("+") + p.count("-") for p in hard) == 4
    with pytest.raises(DataError, match=r"text: fewer than 1000 distinct held-out problems at levels \[1\]"):
        builtin_examples("text", "heldout", 1000, 0, difficulty=1)   # 4,000 problems at level 1, a fifth held out


def test_split_holds_out_a_fifth_and_depends_on_the_key_alone():
    import subprocess
    import sys
    from tasks import HELD_OUT_FRACTION
    held = sum(split_of(f"key-{i}") == "heldout" for i in range(5000)) / 5000
    assert abs(held - HELD_OUT_FRACTION) < 0.02
    # another interpreter, another string-hash seed: the same splits (Python's hash() would differ)
    code = "import sys; sys.path.insert(0, '.'); from tasks import split_of; print(''.join(split_of(f'key-{i}')[0] for i in range(300)))"
    root = __file__.rsplit("/tests/", 1)[0]
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                           env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout.strip() for seed in ("1", "2")]
    assert runs[0] == runs[1] == "".join(split_of(f"key-{i}")[0] for i in range(300))


def test_jsonl_rows_load_with_images_and_verifiers(tmp_path):
    from PIL import Image
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    rows = [{"prompt": "How many?", "answer": 2, "image": "a.png", "verifier": "math"},
            {"prompt": "Pick", "answer": "B", "verifier": "choice"},
            {"prompt": "Frames", "answer": "left", "video": ["a.png", "a.png"]}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    exs = load_jsonl(str(path), "image")
    assert exs[0].image.shape == (16, 16, 3) and exs[0].answer == "2"
    assert exs[1].verifier == "choice" and exs[2].video.shape == (2, 16, 16, 3)
    assert len(load_domain("image", "heldout", 10, 0, 2, {"image": str(path)})) == 1


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "answer": "1"}\n{not json\n', "d.jsonl:2: not valid JSON"),
    ('{"prompt": "a"}\n', "d.jsonl:1: a row needs"),
    ('{"prompt": "a", "answer": "1", "image": "missing.png"}\n', "d.jsonl:1: cannot read image"),
    ('{"prompt": "a", "answer": "1", "verifier": "fuzzy"}\n', "d.jsonl:1: unknown verifier"),
    ('\n', "d.jsonl: no rows"),
])
def test_bad_jsonl_names_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message.replace(".", r"\.")):
        load_jsonl(str(path), "image")


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a", "answer": "   "}, "'answer' must be a non-empty string"),
    ({"prompt": "  ", "answer": "1"}, "the prompt is empty"),
    ({"prompt": "a", "answer": "1", "solution": "x"}, "unknown key(s) 'solution'"),
    ({"prompt": "a", "answer": "1", "images": ["p.png", "p.png"]}, "'images' must be a list of exactly one picture"),
])
def test_rows_that_would_train_wrong_are_refused(tmp_path, row, message):
    from tasks import DataError, load_jsonl
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=re.escape(f"d.jsonl:1: {message}")):
        load_jsonl(str(path), "image")


def test_an_images_list_is_read_as_the_rows_picture(tmp_path):
    from PIL import Image
    from tasks import load_jsonl
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "p.png")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "answer": "1", "images": ["p.png"]}) + "\n")
    ex, = load_jsonl(str(path), "image")
    assert ex.image.shape == (8, 8, 3) and ex.image[0, 0].tolist() == [255, 0, 0]


def test_sixteen_bit_and_float_pictures_are_scaled_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image
    from tasks import load_jsonl
    half16 = np.full((4, 4), 32768, dtype=np.uint16)
    Image.fromarray(half16).save(tmp_path / "a.png")                     # a 16-bit grey PNG
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tmp_path / "b.tiff")
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": "a", "answer": "1", "image": f}) + "\n" for f in ("a.png", "b.tiff")))
    for ex in load_jsonl(str(path), "image"):
        assert ex.image.dtype == np.uint8 and abs(int(ex.image[0, 0, 0]) - 128) <= 1, ex.source


def test_image_worked_steps_count_each_vision_token_in_the_order_the_model_reads_them():
    """running_counts: the running total after each vision token's 2x2 cells ends at the answer,
    adds 0-4 a token, and token i is the i-th merged patch of what the model sees (patchify's order)."""
    import torch
    from policy import Processor, patchify
    from tasks import CELL, GRID, draw_cells, running_counts
    for ex in builtin_examples("image", "train", 200, 0):
        totals = [int(x) for x in ex.steps.split(",")]
        steps = [b - a for a, b in zip([0] + totals, totals)]
        assert len(totals) == (GRID // 2) ** 2 and totals[-1] == int(ex.answer) and all(0 <= s <= 4 for s in steps)
        assert ex.target() == f"<answer>{ex.answer}</answer>" and ex.target(steps=True) == ex.steps + ex.target()
    proc = Processor(tokenizer=None, patch_size=CELL, merge_size=2)
    black, _ = patchify(torch.from_numpy(draw_cells({}))[None], proc)
    for cell in [(0, 0), (0, 5), (3, 2), (5, 5)]:
        pixels, _ = patchify(torch.from_numpy(draw_cells({cell: "red"}))[None], proc)
        lit = {int(i) // 4 for i in torch.nonzero((pixels != black).any(-1)).flatten()}   # merge² patches a token
        totals = running_counts({cell: "red"}, "red").split(",")
        assert lit == {totals.index("1")}
    assert running_counts({(0, 0): "red", (0, 1): "blue"}, "red") == "1,1,1,1,1,1,1,1,1"
    assert all(not ex.steps for ex in builtin_examples("video", "train", 5, 0))


@pytest.mark.parametrize("domain", ["text", "swap"])
def test_arithmetic_worked_steps_are_running_totals_that_end_at_the_answer(domain):
    from warmstart import RESPONSE_TOKENS
    for ex in builtin_examples(domain, "train", 300, 0):
        steps = ex.steps.rstrip(",").split(",")
        assert len(steps) == ex.level + 1 and steps[-1].split("=")[1] == ex.answer
        assert len(ex.target(steps=True)) - len("<answer></answer>") + 3 <= RESPONSE_TOKENS[domain]
    text = [ex for ex in builtin_examples("text", "train", 50, 0) if ex.prompt == "Compute 6-3+0."]
    assert text and text[0].target(steps=True) == "-3=3,+0=3,<answer>3</answer>"
