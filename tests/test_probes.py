import copy

import pytest
import torch

from evaluate import accuracy
from policy import prompt_of
from probes import drift, ensemble_accuracy, ensemble_generate, interpolate, load_branches, save_branches
from rollout import SamplingConfig, generate
from tasks import builtin_examples

SAMPLING = SamplingConfig(max_new_tokens=6)


def shifted(model, by: float):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(by)
    return other


def test_drift_is_the_distance_over_the_base_norm(tiny):
    model, _ = tiny
    a, b = shifted(model, 0.01), shifted(model, -0.02)
    n = sum(p.numel() for p in model.parameters())
    norm0 = float(torch.cat([p.detach().double().flatten() for p in model.parameters()]).norm())
    d = drift({"a": a, "b": b}, model, [("a", "b")])
    assert d["a~b"] == pytest.approx(0.03 * n ** 0.5 / norm0, rel=1e-4)
    assert d["a~base"] == pytest.approx(0.01 * n ** 0.5 / norm0, rel=1e-4)
    assert d["b~base"] == pytest.approx(0.02 * n ** 0.5 / norm0, rel=1e-4)
    assert drift({"a": model}, model, []) == {"a~base": 0.0}


def test_interpolation_runs_from_one_branch_to_the_other(tiny):
    model, _ = tiny
    before = copy.deepcopy(model)
    other = shifted(model, 1.0)
    for alpha in (0.0, 0.25, 1.0):
        between = interpolate(model, other, alpha)
        for p, q in zip(model.parameters(), between.parameters()):
            assert torch.allclose(q, p + alpha, atol=1e-6)
    for p, q in zip(model.parameters(), before.parameters()):   # the branches themselves untouched
        assert torch.equal(p, q)


def test_an_ensemble_of_one_policy_decodes_as_that_policy(tiny):
    """Averaging K copies of one distribution is that distribution: the ensemble's greedy
    responses and accuracy are the model's own."""
    model, proc = tiny
    exs = builtin_examples("text", "heldout", 5, 0) + builtin_examples("image", "heldout", 3, 0)
    prompts = [prompt_of(proc, ex) for ex in exs]
    own = generate(model, proc, prompts, 1, SAMPLING, greedy=True).texts
    assert ensemble_generate([model, copy.deepcopy(model)], proc, prompts, SAMPLING) == own
    assert ensemble_accuracy([model, model], proc, exs, SAMPLING) == accuracy(model, proc, exs, SAMPLING, samples=0)["greedy"]


def test_the_ensemble_follows_the_mean_probability_not_either_model(tiny):
    """Where two models disagree, the ensemble takes the token of highest mean probability:
    checked on the first response token against the two models' own distributions."""
    model, proc = tiny
    other = shifted(model, 0.0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    from rollout import prefill, sampling_logprobs
    prompts = [prompt_of(proc, ex) for ex in builtin_examples("text", "heldout", 8, 0)]
    mean = sum(sampling_logprobs(prefill(m, proc, prompts).logits, SAMPLING, proc).exp() for m in (model, other)) / 2
    first = ensemble_generate([model, other], proc, prompts, SamplingConfig(max_new_tokens=1))
    assert first == proc.tokenizer.batch_decode(mean.argmax(-1)[:, None], skip_special_tokens=True)


def test_saved_branches_load_back_bit_for_bit(tiny, tmp_path):
    model, _ = tiny
    branches = {"text": shifted(model, 0.5), "image": shifted(model, -0.5)}
    save_branches(branches, str(tmp_path / "copd-branches"))
    assert sorted(p.name for p in (tmp_path / "copd-branches").iterdir()) == ["image.pt", "text.pt"]
    loaded = load_branches(str(tmp_path / "copd-branches"), model)
    for d in branches:
        for p, q in zip(branches[d].parameters(), loaded[d].parameters()):
            assert torch.equal(p, q)
