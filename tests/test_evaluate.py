from types import SimpleNamespace

import evaluate
from rollout import SamplingConfig
from tasks import Example


def scripted(monkeypatch, greedy_texts: list, samples: list):
    """generate() answers with fixed texts: the greedy ones, or k samples per prompt."""
    monkeypatch.setattr(evaluate, "generate", lambda model, proc, prompts, k, cfg, greedy=False, prefilled=None:
                        SimpleNamespace(texts=greedy_texts if greedy else samples))
    monkeypatch.setattr(evaluate, "prefill", lambda model, proc, prompts: None)
    monkeypatch.setattr(evaluate, "prompt_of", lambda proc, ex: ex.prompt)


def test_learning_signal_counts_what_grpo_can_learn(monkeypatch):
    """Four problems, k = 4: one always right (no advantage), one right once (pass@k, signal),
    one always wrong with the same answer (systematic), one wrong in four different ways."""
    exs = [Example("text", f"p{i}", "7", "math") for i in range(4)]
    a = lambda x: f"<answer>{x}</answer>"
    samples = [a(7)] * 4 + [a(7), a(1), a(2), a(3)] + [a(5)] * 4 + [a(1), a(2), a(3), a(4)]
    scripted(monkeypatch, [a(7), a(1), a(5), a(9)], samples)
    s = evaluate.learning_signal(None, None, exs, SamplingConfig(), k=4)
    assert s == {"greedy": 0.25, "pass@4": 0.5, "zero_advantage": 0.75, "systematic": 0.25}


def test_accuracy_says_which_problems_greedy_got_right(monkeypatch):
    exs = [Example("text", f"p{i}", "7", "math") for i in range(4)]
    a = lambda x: f"<answer>{x}</answer>"
    scripted(monkeypatch, [a(7), a(1), a(7), a(9)], [])
    assert evaluate.accuracy(None, None, exs, SamplingConfig(), samples=0) == {"greedy": 0.5, "right": "1010"}
