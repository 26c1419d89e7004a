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
    ("1e3", "1000", "math", True),
    ("$1,234$.", "1234", "math", True),
    ("1,2", "12", "math", False),             # a comma that is not a thousands separator
    ("1,2,3", "123", "math", False),
    ("12,34", "1234", "math", False),
    ("x = 3", "3", "math", True),             # an equation counts as its right-hand side
    ("3 apples", "3", "math", True),          # words around a number are ignored
    ("2^{10}", "1024", "math", True),
    ("(1,2)", "(1,2)", "math", True),         # a tuple gold is not a number: commas are fine
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


PATHOLOGICAL = ["1e100000000", "1e10000000", "-1E99999", "2^{2^{2^{2^{2^{2}}}}}", "10^{10^{10}}", "9**9**9",
                "2^{99999}", "(10)^(10^10)", "x" * 5000, "1" * 5000]


@pytest.mark.parametrize("answer", PATHOLOGICAL)
def test_costly_answers_are_wrong_without_being_evaluated(answer, monkeypatch):
    """The bound is asserted by counting: neither math-verify nor an exact Fraction is ever
    asked to evaluate these (each would take seconds to forever), and they score as wrong."""
    import math_verify
    import verifiers
    calls = []
    monkeypatch.setattr(math_verify, "parse", lambda *a, **k: calls.append(("parse", a)) or [])
    monkeypatch.setattr(math_verify, "verify", lambda *a, **k: calls.append(("verify", a)) or False)
    real_fraction = verifiers.Fraction

    def counted_fraction(s):
        calls.append(("Fraction", s))
        return real_fraction(s)
    monkeypatch.setattr(verifiers, "Fraction", counted_fraction)
    for gold in ("1", "1024"):
        assert reward(f"<answer>{answer}</answer>", gold, "math") == pytest.approx(0.1)
    assert [c for c in calls if c[0] != "Fraction" or len(c[1]) > 10] == []


def test_math_verify_runs_under_a_cap_and_its_timeouts_are_silent(monkeypatch, capsys):
    import logging
    import math_verify
    from verifiers import MATH_VERIFY_TIMEOUT_S, _math_verify
    _math_verify.cache_clear()
    caps = []
    real_parse, real_verify = math_verify.parse, math_verify.verify
    monkeypatch.setattr(math_verify, "parse", lambda s, **k: caps.append(k["parsing_timeout"]) or real_parse(s, **k))
    monkeypatch.setattr(math_verify, "verify",
                        lambda g, p, **k: caps.append(k["timeout_seconds"]) or real_verify(g, p, **k))
    assert is_correct("\\frac{2}{4}", "\\frac{1}{2}", "math")
    assert caps == [MATH_VERIFY_TIMEOUT_S] * 3 and MATH_VERIFY_TIMEOUT_S <= 1   # at most 3 s per response
    assert is_correct("\\frac{2}{4}", "\\frac{1}{2}", "math") and len(caps) == 3     # remembered, not parsed again
    logging.getLogger("math_verify.grader").warning("Timeout during comparison")
    assert "Timeout" not in capsys.readouterr().err


def test_a_blank_gold_answer_rewards_nothing():
    from verifiers import grade
    assert grade("<answer></answer>", "   ", "math") == (0.1, False)
    assert grade("<answer> </answer>", "", "exact") == (0.1, False)
