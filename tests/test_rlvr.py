import math

import torch

from policy import encode_prompt
from rlvr import PGBatch, RLConfig, backward_tokens, clipped_surrogate, group_advantages, k3_kl, loss_weights, update
from rollout import SamplingConfig, generate, response_logits, sampling_logprobs, token_logprobs
from tasks import builtin_examples


def test_grpo_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()           # unbiased, as torch.std
    a = group_advantages(r, "grpo")
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6))
    assert torch.equal(a[1], torch.zeros(4))                          # no signal in an all-equal group
    assert torch.allclose(group_advantages(r, "dr_grpo")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_clipping_on_both_sides():
    old = torch.zeros(1, 4)
    ratios = torch.tensor([[1.5, 1.5, 0.5, 0.5]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, clipped = clipped_surrogate(ratios.log(), old, adv, eps_low=0.2, eps_high=0.28)
    # A>0, ρ=1.5: min(1.5, 1.28) -> 1.28 (clipped high); A<0, ρ=1.5: min(-1.5, -1.28) -> -1.5
    # A>0, ρ=0.5: min(0.5, 0.8) -> 0.5;  A<0, ρ=0.5: min(-0.5, -0.8) -> -0.8 (clipped low)
    assert torch.allclose(loss, -torch.tensor([[1.28, -1.5, 0.5, -0.8]]))
    assert clipped.tolist() == [[True, False, False, True]]


def test_clipped_tokens_carry_no_gradient():
    logp = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    loss, _ = clipped_surrogate(logp, torch.zeros(1, 2), torch.ones(1, 2), 0.2, 0.28)
    loss.sum().backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] < 0


def test_token_level_normalisation_over_all_batches():
    m1 = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    m2 = torch.tensor([[1.0, 1.0, 1.0]])
    w1, w2 = loss_weights([m1, m2], "token")
    assert torch.allclose(w1.sum() + w2.sum(), torch.tensor(1.0))
    assert torch.allclose(w1[0, 0], torch.tensor(1 / 6)) and torch.allclose(w2[0, 2], torch.tensor(1 / 6))
    s1, s2 = loss_weights([m1, m2], "seq")        # each sequence weighs 1/N, spread over its tokens
    assert torch.allclose(s1[1, 0], torch.tensor(1 / 3)) and torch.allclose(s2[0, 0], torch.tensor(1 / 9))
    d1, _ = loss_weights([m1, m2], "seq_len_max", max_len=3)
    assert torch.allclose(d1[0, 0], torch.tensor(1 / 9))


def test_k3_is_zero_at_the_reference_and_positive_elsewhere():
    lp = torch.tensor([-1.0, -2.0])
    assert torch.allclose(k3_kl(lp, lp), torch.zeros(2))
    assert (k3_kl(lp, lp + 0.3) > 0).all()


def _rollout(model, proc, n_prompts=3, G=4):
    exs = builtin_examples("text", "train", n_prompts, 0)
    prompts = [encode_prompt(proc, e.prompt) for e in exs]
    torch.manual_seed(0)
    return generate(model, proc, prompts, G, SamplingConfig(max_new_tokens=6))


def test_micro_batching_does_not_change_the_gradient(tiny):
    model, proc = tiny
    rollout = _rollout(model, proc)
    adv = torch.randn(rollout.mask.shape[0], 1) * rollout.mask
    grads = []
    for micro in (64, 5):
        cfg = RLConfig(micro_batch=micro, sampling=SamplingConfig(max_new_tokens=6))
        w = loss_weights([rollout.mask], cfg.loss_agg)[0]
        model.zero_grad()
        backward_tokens(model, proc, PGBatch(rollout, adv), w, cfg)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    model.zero_grad()
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_one_step_raises_the_logprob_of_rewarded_responses(tiny):
    import copy
    model, proc = tiny
    model = copy.deepcopy(model)
    cfg = RLConfig(sampling=SamplingConfig(max_new_tokens=6))
    rollout = _rollout(model, proc)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0] * 3).view(3, 4)
    adv = group_advantages(rewards).view(-1, 1) * rollout.mask

    def seq_logp():
        with torch.no_grad():
            lg = response_logits(model, proc, rollout.prompts, rollout.response)
        return (token_logprobs(sampling_logprobs(lg, cfg.sampling, proc), rollout.response) * rollout.mask).sum(-1)
    before = seq_logp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stats, _ = update(model, opt, proc, [PGBatch(rollout, adv)], cfg)
    after = seq_logp()
    assert not stats["skipped"]
    rewarded = rewards.view(-1) > 0
    assert (after - before)[rewarded].mean() > 0 > (after - before)[~rewarded].mean()


def test_a_non_finite_loss_skips_the_step(tiny):
    import copy
    model, proc = tiny
    model = copy.deepcopy(model)
    cfg = RLConfig(sampling=SamplingConfig(max_new_tokens=6))
    rollout = _rollout(model, proc)
    adv = torch.full((rollout.mask.shape[0], 1), float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    stats, _ = update(model, torch.optim.AdamW(model.parameters(), lr=1e-2), proc, [PGBatch(rollout, adv)], cfg)
    assert stats["skipped"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
