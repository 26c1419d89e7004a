import copy

import torch

from opd import (OPDConfig, distribution_rows, divergence, opd_advantages, opd_batch, opd_rollout, opd_step,
                 reverse_kl_full, reverse_kl_topk, symmetric_kl, teacher_logprobs, topk_overlap)
from policy import build_tiny_policy
from rlvr import RLConfig, clipped_surrogate, token_loss, update
from rollout import SamplingConfig, response_logits, sampling_logprobs, token_logprobs
from tasks import builtin_examples
from conftest import SMALL

RL = RLConfig(sampling=SamplingConfig(max_new_tokens=6))


def other_model(proc, seed=1):
    return build_tiny_policy(proc.tokenizer, SMALL, seed=seed)


def scored_batch(student, teachers, proc, exs, cfg):
    """Student rollouts on `exs`, graded by teachers[domain]: (PGBatch, rollout)."""
    rollout, domains = opd_rollout(student, proc, exs, RL, cfg)
    lp, full = teacher_logprobs(teachers, proc, rollout, domains, RL, distribution_rows(cfg, rollout))
    return opd_batch(rollout, lp, full, cfg), rollout


def test_opd_loss_and_gradient_vanish_when_teacher_is_student(tiny):
    model, proc = tiny
    exs = builtin_examples("text", "train", 4, 0)
    for loss in ("sampled", "full"):
        cfg = OPDConfig(loss=loss, samples_per_prompt=2)
        torch.manual_seed(0)
        batch, _ = scored_batch(model, {"text": model}, proc, exs, cfg)
        model.zero_grad()
        from rlvr import backward_tokens, loss_weights
        w = loss_weights([batch.rollout.mask])[0]
        value, _ = backward_tokens(model, proc, batch, w, RL)
        assert abs(value) < 1e-5
        assert max(p.grad.abs().max() for p in model.parameters() if p.grad is not None) < 1e-5
        student = copy.deepcopy(model)
        stats = opd_step(student, torch.optim.SGD(student.parameters(), lr=0.0), {"text": model}, proc, exs, RL, cfg)
        assert abs(stats["opd_delta"]) < 1e-5
        assert stats["overlap"] == 1.0 and abs(stats["sym_kl"]) < 1e-5
    model.zero_grad()


def reverse_kl_on(student, teacher, proc, rollout):
    with torch.no_grad():
        s = sampling_logprobs(response_logits(student, proc, rollout.prompts, rollout.response), RL.sampling, proc)
        t = sampling_logprobs(response_logits(teacher, proc, rollout.prompts, rollout.response), RL.sampling, proc)
    return float((reverse_kl_full(s, t) * rollout.mask).sum() / rollout.mask.sum())


def test_opd_gradient_lowers_reverse_kl_on_a_fixed_batch(tiny):
    model, proc = tiny
    teacher = other_model(proc)
    exs = builtin_examples("text", "train", 8, 0) + builtin_examples("image", "train", 8, 0)
    for loss in ("sampled", "full", "topk"):
        student = copy.deepcopy(model)
        torch.manual_seed(0)
        batch, _ = scored_batch(student, {"text": teacher, "image": teacher}, proc, exs,
                                OPDConfig(loss=loss, samples_per_prompt=4))
        before = reverse_kl_on(student, teacher, proc, batch.rollout)
        opt = torch.optim.SGD(student.parameters(), lr=0.5)
        update(student, opt, proc, [batch], RL)
        assert reverse_kl_on(student, teacher, proc, batch.rollout) < before, loss


def test_sampled_and_full_forms_agree_in_expectation_on_a_toy_distribution():
    torch.manual_seed(0)
    theta = torch.randn(6, requires_grad=True)
    teacher_logp = torch.randn(6).log_softmax(-1)
    full = reverse_kl_full(theta.log_softmax(-1), teacher_logp)
    g_full, = torch.autograd.grad(full, theta)
    full = full.detach()
    n = 400_000
    logp_all = theta.log_softmax(-1)
    y = torch.multinomial(logp_all.exp().detach(), n, replacement=True)
    logp = logp_all[y]
    adv = opd_advantages(logp.detach(), teacher_logp[y])                  # β·δ
    surrogate, _ = clipped_surrogate(logp, logp.detach(), adv, 0.2, 0.28)
    g_sampled, = torch.autograd.grad(surrogate.mean(), theta)
    assert torch.allclose(g_sampled, g_full, atol=0.02), (g_sampled, g_full)
    # the mean advantage estimates −KL
    assert abs(float(adv.mean()) + float(full)) < 0.02


def test_topk_overlap_and_symmetric_kl():
    torch.manual_seed(0)
    p = torch.randn(3, 5, 50).log_softmax(-1)
    q = torch.randn(3, 5, 50).log_softmax(-1)
    assert torch.equal(topk_overlap(p, p, 10), torch.ones(3, 5))
    assert topk_overlap(p, q, 10).mean() < 0.6
    assert torch.allclose(symmetric_kl(p, p), torch.zeros(3, 5), atol=1e-6)
    assert (symmetric_kl(p, q) > 0).all()
    assert torch.allclose(symmetric_kl(p, q), symmetric_kl(q, p), atol=1e-5)
    assert torch.allclose(reverse_kl_topk(p, q, 50), reverse_kl_full(p, q), atol=1e-5)


def test_topk_reverse_kl_renormalises_over_the_students_top_k():
    torch.manual_seed(0)
    p = torch.randn(3, 5, 50).log_softmax(-1)
    q = torch.randn(3, 5, 50).log_softmax(-1)
    top = p.topk(10, dim=-1).indices
    ps, qs = p.gather(-1, top).softmax(-1), q.gather(-1, top).softmax(-1)   # renormalised by hand
    by_hand = (ps * (ps.log() - qs.log())).sum(-1)
    assert torch.allclose(reverse_kl_topk(p, q, 10), by_hand, atol=1e-5)
    assert (reverse_kl_topk(p, q, 10) >= -1e-6).all()
    same_ranking = p + torch.randn(3, 5, 1)          # the teacher's V_k mass differs, its shape does not
    assert torch.allclose(reverse_kl_topk(p, same_ranking, 10), torch.zeros(3, 5), atol=1e-5)


def test_each_prompt_is_graded_by_its_own_domains_teacher(tiny):
    model, proc = tiny
    teachers = {"text": other_model(proc, 1), "image": other_model(proc, 2)}
    exs = builtin_examples("text", "train", 3, 0) + builtin_examples("image", "train", 3, 0)
    torch.manual_seed(0)
    batch, r = scored_batch(model, teachers, proc, exs, OPDConfig(samples_per_prompt=2))
    # recompute δ with the intended teacher of each row and compare with the advantages used
    for i, ex in enumerate(e for e in exs for _ in range(2)):
        with torch.no_grad():
            t = teachers[ex.domain]
            lp = token_logprobs(sampling_logprobs(response_logits(t, proc, [r.prompts[i]], r.response[i:i + 1]),
                                                  RL.sampling, proc), r.response[i:i + 1])
        expected_delta = ((lp - r.logprobs[i:i + 1]) * r.mask[i:i + 1])
        # at ρ = 1 the surrogate's per-token loss is −Â = −δ
        with torch.no_grad():
            s_lp = sampling_logprobs(response_logits(model, proc, [r.prompts[i]], r.response[i:i + 1]),
                                     RL.sampling, proc)
        loss = token_loss(batch, s_lp, slice(i, i + 1), RL)[0] * r.mask[i:i + 1]
        assert torch.allclose(loss, -expected_delta, atol=1e-4)


def test_divergence_of_a_model_with_itself(tiny):
    model, proc = tiny
    d = divergence(model, model, proc, builtin_examples("video", "train", 3, 0), RL)
    assert d["overlap"] == 1.0 and abs(d["sym_kl"]) < 1e-5
    d2 = divergence(model, other_model(proc), proc, builtin_examples("video", "train", 3, 0), RL)
    assert d2["overlap"] < 1.0 and d2["sym_kl"] > 0
