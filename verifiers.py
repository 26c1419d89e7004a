"""
Verifiable rewards r_d(x, y) = 0.9·correct + 0.1·format (the framework the paper builds on).

  extract_answer: the last <answer>…</answer>, else the last \\boxed{…}, else what follows "####".
  is_correct    : "exact" (normalised string), "math" (numeric, then math-verify for fractions
                  and LaTeX), "choice" (one option letter).

A verifier never raises on any model output: a policy can write anything.
"""

import re
from fractions import Fraction

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
CHOICE_RE = re.compile(r"^\(?([A-Za-z])\)?[.):]?(?:\s|$)")


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
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _math_verify(pred: str, gold: str) -> bool:
    from math_verify import parse, verify
    try:
        gold_parsed, pred_parsed = parse(f"${gold}$"), parse(f"${pred}$")
        return bool(gold_parsed) and bool(pred_parsed) and bool(verify(gold_parsed, pred_parsed))
    except Exception:  # its parser can fail on adversarial LaTeX: a wrong answer, never a crash
        return False


def _choice(s: str):
    m = CHOICE_RE.match(s.strip())
    return m.group(1).upper() if m else None


def is_correct(pred, gold: str, kind: str = "exact") -> bool:
    if pred is None:
        return False
    if kind == "choice":
        return _choice(pred) is not None and _choice(pred) == _choice(gold)
    if kind == "math":
        a, b = _number(pred), _number(gold)
        if a is not None and b is not None:
            return a == b
        return _normalise(pred) == _normalise(gold) or _math_verify(pred, gold)
    return _normalise(pred) == _normalise(gold)


def reward(response: str, gold: str, kind: str = "exact") -> float:
    """0.9·correct + 0.1·format, where format means an <answer> tag is present."""
    correct = is_correct(extract_answer(response), gold, kind)
    formatted = ANSWER_RE.search(response) is not None
    return 0.9 * correct + 0.1 * formatted
