import random
import string

import pytest

from verifiers import extract_answer, is_correct, reward


@pytest.mark.parametrize("text, expected", [
    ("<answer>42</answer>", "42"),
    ("think <answer> 7 </answer> then <answer>8</answer>", "8"),           # the last one
    ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
    ("nested \\boxed{x^{2}+1}", "x^{2}+1"),
    ("work...\n#### 1,234", "1,234"),
    ("<answer>3</answer> and \\boxed{4}", "3"),                             # <answer> wins over \boxed
    ("no answer here", None),
    ("<answer>unclosed", None),
    ("\\boxed{unclosed", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("pred, gold, kind, ok", [
    ("42", "42", "math", True),
    ("42.0", "42", "math", True),
    ("1,000", "1000", "math", True),
    ("-3", "-3", "math", True),
    ("3", "-3", "math", False),
    ("1/2", "0.5", "math", True),
    ("\\frac{1}{2}", "0.5", "math", True),
    ("\\frac{2}{4}", "\\frac{1}{2}", "math", True),
    ("x", "2", "math", False),
    ("Left", "left", "exact", True),
    ("left.", "left", "exact", True),
    ("right", "left", "exact", False),
    ("(B)", "B", "choice", True),
    ("b) up", "B", "choice", True),
    ("C", "B", "choice", False),
    ("because", "B", "choice", False),
    (None, "1", "math", False),
])
def test_is_correct(pred, gold, kind, ok):
    assert is_correct(pred, gold, kind) is ok


def test_reward_is_point_nine_correct_plus_point_one_format():
    assert reward("<answer>5</answer>", "5", "math") == pytest.approx(1.0)
    assert reward("<answer>6</answer>", "5", "math") == pytest.approx(0.1)
    assert reward("\\boxed{5}", "5", "math") == pytest.approx(0.9)
    assert reward("5", "5", "math") == pytest.approx(0.0)


def test_arbitrary_strings_never_raise():
    """Every piece a response passes through, called directly: no catch-all hides a raise."""
    from verifiers import _choice, _number
    rng = random.Random(0)
    pieces = ["<answer>", "</answer>", "\\boxed{", "}", "{", "####", "\\frac{", "^", "$", "\\", "(", ")",
              "1/0", "0/0", "nan", "inf", "1e999", "\x00", "é", "∞", ",", ".", "-"]
    alphabet = string.printable + "".join(pieces)
    for _ in range(2000):
        parts = [rng.choice(pieces) if rng.random() < 0.4 else rng.choice(alphabet) for _ in range(rng.randint(0, 40))]
        text = "".join(parts)
        answer = extract_answer(text)
        assert answer is None or isinstance(answer, str)
        _number(text), _choice(text)
        for kind in ("math", "exact", "choice"):
            gold = rng.choice(["1", "B", "\\frac{1}{2}", "left"])
            assert is_correct(text, gold, kind) in (True, False)
            assert 0.0 <= reward(text, gold, kind) <= 1.0
