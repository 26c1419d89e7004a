"""
Verifiable rewards r_d(x, y) = 0.9·correct + 0.1·format (the framework the paper builds on).

  extract_answer: the last <answer>…</answer>, else the last \\boxed{…}, else what follows "####".
  is_correct    : "exact" (normalised string), "math" (below), "choice" (one option letter).

What "math" accepts as equal to the gold answer:
  - the same plain number: integers, decimals, scientific notation ("1e3" = 1000), fractions
    ("1/2" = 0.5); a leading sign, "$" and a trailing "." are ignored; commas only as thousands
    separators ("1,234" = 1234, while "1,2" is not a number and is wrong for gold 12);
  - otherwise what math-verify proves equal: LaTeX (\\frac{1}{2}, 2^{10}, \\sqrt{4}), an equation
    whose right-hand side is the value ("x = 3" for 3), a number with words around it
    ("3 apples" for 3).
  Everything is bounded, so one sampled response never stalls a batch: an answer over
  MAX_ANSWER_CHARS characters, a plain number with an exponent over MAX_EXPONENT, and a power
  tower (a power inside an exponent: 10^{10^{10}}, 9**9**9), an exponent literal over
  MAX_EXPONENT_DIGITS digits or "1e100000000" are wrong without being evaluated; math-verify runs with a
  MATH_VERIFY_TIMEOUT_S cap on each of its parses and its comparison (its timeout messages are
  silenced: a timed-out answer is simply wrong).

A verifier never raises on any model output: a policy can write anything.
"""

import functools
import logging
import re
from fractions import Fraction

import torch

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
CHOICE_RE = re.compile(r"^\(?([A-Za-z])\)?[.):]?(?:\s|$)")
NUMBER_RE = re.compile(r"^[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][+-]?\d+)?$|^[+-]?\d+/\d+$")
COMMA_NUMBER_RE = re.compile(r"\d[\d,]*,\d+")
THOUSANDS_RE = re.compile(r"^\d{1,3}(?:,\d{3})+$")
EXPONENT_RE = re.compile(r"\^|\*\*")
SCIENTIFIC_RE = re.compile(r"\d[eE][+-]?(\d+)")
MAX_ANSWER_CHARS = 200
MAX_EXPONENT = 1000
MAX_EXPONENT_DIGITS = 4
MATH_VERIFY_TIMEOUT_S = 1
logging.getLogger("math_verify").setLevel(logging.CRITICAL)


def _last_boxed(text: str):
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(text: str):
    """The final answer, or None when the response has none."""
    found = ANSWER_RE.findall(text)
    if found:
        return found[-1].strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    return None


def _normalise(s: str) -> str:
    return " ".join(s.strip().strip(".").lower().split())


def _number(s: str):
    """A plain number as an exact Fraction, or None (not a plain number, or one too large)."""
    s = s.replace("$", "").strip().rstrip(".")
    if len(s) > MAX_ANSWER_CHARS or not s or not NUMBER_RE.match(s):
        return None
    mantissa, _, exponent = s.lower().partition("e")
    if exponent and abs(int(exponent)) > MAX_EXPONENT:
        return None
    try:
        return Fraction(s.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _bad_commas(s: str) -> bool:
    """A comma between digits that is not a thousands separator ("1,2")."""
    return any(not THOUSANDS_RE.match(m) for m in COMMA_NUMBER_RE.findall(s))


def _exponent(s: str, at: int) -> str:
    """The exponent after the power operator ending at `at`: a {braced group} or one token."""
    if s[at:at + 1] == "{":
        depth = 0
        for j in range(at, len(s)):
            depth += {"{": 1, "}": -1}.get(s[j], 0)
            if depth == 0:
                return s[at + 1:j]
        return s[at + 1:]
    m = re.match(r"\s*[(]?[-+]?[\w.]+", s[at:])
    return s[at:at + m.end()] if m else ""


def _too_costly(s: str) -> bool:
    """An answer math-verify could spend seconds or unbounded memory on: too long, a power
    tower, or an exponent with too many digits."""
    if len(s) > MAX_ANSWER_CHARS or any(int(e) > MAX_EXPONENT for e in SCIENTIFIC_RE.findall(s)):
        return True
    for m in EXPONENT_RE.finditer(s):
        exponent = _exponent(s, m.end())
        if EXPONENT_RE.search(exponent) or EXPONENT_RE.match(s[m.end() + len(exponent):].lstrip(" )")):
            return True
        if any(len(digits) > MAX_EXPONENT_DIGITS for digits in re.findall(r"\d+", exponent)):
            return True
    return False


@functools.lru_cache(maxsize=1 << 14)
def _math_verify(pred: str, gold: str) -> bool:
    """Tens of milliseconds a call, and a policy repeats its wrong answers: remembered."""
    from math_verify import parse, verify
    if _too_costly(pred) or _too_costly(gold):
        return False
    try:
        gold_parsed = parse(f"${gold}$", parsing_timeout=MATH_VERIFY_TIMEOUT_S)
        pred_parsed = parse(f"${pred}$", parsing_timeout=MATH_VERIFY_TIMEOUT_S)
        return bool(gold_parsed) and bool(pred_parsed) and bool(
            verify(gold_parsed, pred_parsed, timeout_seconds=MATH_VERIFY_TIMEOUT_S))
    except Exception:  # its parser can fail on adversarial LaTeX: a wrong answer, never a crash
        return False


def _choice(s: str):
    m = CHOICE_RE.match(s.strip())
    return m.group(1).upper() if m else None


def is_correct(pred, gold: str, kind: str = "exact") -> bool:
    if pred is None or not gold.strip():   # a blank gold answer rewards no answer: nothing is right
        return False
    if pred == gold and kind != "choice":   # most right answers: no parsing ("choice" needs a letter)
        return True
    if kind == "choice":
        return _choice(pred) is not None and _choice(pred) == _choice(gold)
    if kind == "math":
        a, b = _number(pred), _number(gold)
        if a is not None and b is not None:
            return a == b
        if b is not None and _bad_commas(pred):
            return False
        return _normalise(pred) == _normalise(gold) or _math_verify(pred, gold)
    return _normalise(pred) == _normalise(gold)


def grade(response: str, gold: str, kind: str = "exact") -> tuple:
    """(reward, correct): r = 0.9·correct + 0.1·format, where format means an <answer> tag is
    present. One verdict per response: the trainer needs both."""
    correct = is_correct(extract_answer(response), gold, kind)
    formatted = ANSWER_RE.search(response) is not None
    return 0.9 * correct + 0.1 * formatted, correct


def reward(response: str, gold: str, kind: str = "exact") -> float:
    return grade(response, gold, kind)[0]


def score(texts: list, examples: list, group_size: int) -> tuple:
    """Rewards r_i and correctness of responses laid out as `group_size` per example, each
    graded by its example's verifier: two (N,) tensors."""
    graded = [grade(text, examples[i // group_size].answer, examples[i // group_size].verifier)
              for i, text in enumerate(texts)]
    return (torch.tensor([r for r, _ in graded]), torch.tensor([ok for _, ok in graded], dtype=torch.float))
