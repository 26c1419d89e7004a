import copy

import pytest
import torch

from policy import encode_prompt
from rollout import SamplingConfig, generate, prefill, response_logits, response_mask, sampling_logprobs, token_logprobs
from tasks import builtin_examples


def mixed_prompts(proc):
    """Text, image and video prompts of different lengths, for one left-padded batch."""
    exs = (builtin_examples("text", "train", 2, 0) + builtin_examples("image", "train", 2, 0)
           + builtin_examples("video", "train", 2, 0))
    exs[0].prompt = "Compute 1+2+3+4+5+6+7+8+9, carefully."   # longer than the rest
    return [encode_prompt(proc, e.prompt, e.image, e.video) for e in exs]


def teacher_forced(model, proc, rollout, cfg):
    with torch.no_grad():
        logits = response_logits(model, proc, rollout.prompts, rollout.response)
    return token_logprobs(sampling_logprobs(logits, cfg, proc), rollout.response) * rollout.mask


def test_sampler_logprobs_equal_teacher_forced_logprobs(tiny):
    model, proc = tiny
    prompts = mixed_prompts(proc)
    assert len({len(p.ids) for p in prompts}) > 1
    for cfg in (SamplingConfig(max_new_tokens=12), SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=12)):
        torch.manual_seed(0)
        rollout = generate(model, proc, prompts, group_size=3, cfg=cfg)
        assert rollout.response.shape[0] == 3 * len(prompts)
        assert torch.allclose(teacher_forced(model, proc, rollout, cfg), rollout.logprobs, atol=1e-4)


def test_group_rows_share_the_prompt_but_not_the_sample(tiny):
    model, proc = tiny
    torch.manual_seed(1)
    rollout = generate(model, proc, mixed_prompts(proc)[:2], group_size=4, cfg=SamplingConfig(max_new_tokens=8))
    assert rollout.prompts[0] is rollout.prompts[3] and rollout.prompts[4] is not rollout.prompts[3]
    assert len({tuple(r.tolist()) for r in rollout.response[:4]}) > 1


def test_rows_stop_independently_at_eos(tiny):
    model, proc = tiny
    eos = proc.eos_ids[0]

    def favour_eos(module, inputs, logits):   # EOS likely: some rows stop early, others run on
        logits[..., eos] += 3.0
        return logits
    hook = model.lm_head.register_forward_hook(favour_eos)
    try:
        torch.manual_seed(0)
        cfg = SamplingConfig(max_new_tokens=16)
        rollout = generate(model, proc, mixed_prompts(proc), group_size=4, cfg=cfg)
        assert torch.allclose(teacher_forced(model, proc, rollout, cfg), rollout.logprobs, atol=1e-4)
    finally:
        hook.remove()
    lengths = rollout.mask.sum(-1).long()
    assert lengths.min() < lengths.max()
    for i, (row, n) in enumerate(zip(rollout.response, lengths)):
        stopped = (row == eos).nonzero()
        if len(stopped):
            first = int(stopped[0])
            assert n == first + 1                              # EOS is inside the mask
            assert (row[first + 1:] == proc.pad_id).all()      # nothing sampled after it
            assert (rollout.logprobs[i, first + 1:] == 0).all()
        else:
            assert n == row.shape[0]


def test_response_mask_is_built_from_positions_when_pad_equals_eos():
    eos = 7
    response = torch.tensor([[3, 7, 7, 7], [7, 7, 7, 7], [1, 2, 3, 4]])   # pad == eos
    assert response_mask(response, [eos]).tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]


def test_never_samples_past_the_vocabulary_or_a_placeholder(tiny):
    model, proc = tiny
    logits = torch.zeros(2, proc.vocab_size + 5)
    logits[:, proc.vocab_size:] = 100.0
    logits[:, proc.image_id] = 50.0
    logp = sampling_logprobs(logits, SamplingConfig(), proc)
    assert torch.isinf(logp[:, proc.vocab_size:]).all() and torch.isinf(logp[:, proc.image_id]).all()
    assert torch.allclose(logp.exp().sum(-1), torch.ones(2))


def test_greedy_is_deterministic_and_top_p_keeps_the_nucleus(tiny):
    model, proc = tiny
    prompts = mixed_prompts(proc)[:3]
    a = generate(model, proc, prompts, 1, SamplingConfig(max_new_tokens=6), greedy=True)
    b = generate(model, proc, prompts, 1, SamplingConfig(max_new_tokens=6), greedy=True)
    assert torch.equal(a.response, b.response)
    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0]])
    proc_like = type("P", (), {"vocab_size": 4, "image_id": -1, "video_id": -1})()
    logp = sampling_logprobs(logits, SamplingConfig(top_p=0.7), proc_like)
    assert torch.isinf(logp[0, 2:]).all() and torch.isfinite(logp[0, :2]).all()


def test_static_cache_path_matches_teacher_forced_logprobs(tiny):
    """The GPU path's step function, run eagerly: same contract as the dynamic-cache sampler."""
    from rollout import generate_static
    model, proc = tiny
    prompts = mixed_prompts(proc)
    cfg = SamplingConfig(max_new_tokens=12, done_check_every=3)
    torch.manual_seed(0)
    rollout = generate_static(model, proc, prompts, group_size=3, cfg=cfg, capture=False)
    assert rollout.response.shape == (3 * len(prompts), 12)
    assert torch.allclose(teacher_forced(model, proc, rollout, cfg), rollout.logprobs, atol=1e-4)
    greedy_static = generate_static(model, proc, prompts, 1, cfg, greedy=True, capture=False)
    greedy_dynamic = generate(model, proc, prompts, 1, cfg, greedy=True)
    n = min(greedy_static.response.shape[1], greedy_dynamic.response.shape[1])
    assert torch.equal(greedy_static.response[:, :n] * greedy_static.mask[:, :n].long(),
                       greedy_dynamic.response[:, :n] * greedy_dynamic.mask[:, :n].long())


@pytest.mark.parametrize("path", ["dynamic", "static"])
def test_one_prefill_serves_greedy_and_sampled_decoding_unchanged(tiny, path):
    """Decoding from a shared prefill gives the very tokens and log-probs of generating from
    scratch, and leaves the prefill as it was for the next call (evaluate.accuracy relies on both)."""
    from rollout import generate_static
    model, proc = tiny
    prompts = mixed_prompts(proc)
    cfg = SamplingConfig(max_new_tokens=12)
    decode = generate if path == "dynamic" else (lambda *a, **k: generate_static(*a, capture=False, **k))
    state = prefill(model, proc, prompts)
    keys_before = [layer.keys.clone() for layer in state.cache.layers]
    for greedy, G in ((True, 1), (False, 3)):
        torch.manual_seed(0)
        shared = decode(model, proc, prompts, G, cfg, greedy=greedy, prefilled=state)
        torch.manual_seed(0)
        scratch = decode(model, proc, prompts, G, cfg, greedy=greedy)
        assert torch.equal(shared.response, scratch.response) and torch.equal(shared.logprobs, scratch.logprobs)
    assert all(torch.equal(layer.keys, k) for layer, k in zip(state.cache.layers, keys_before))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_sampler_matches_teacher_forced_logprobs(tiny):
    model, proc = tiny
    model = copy.deepcopy(model).cuda()
    prompts = mixed_prompts(proc)
    cfg = SamplingConfig(max_new_tokens=12)
    for _ in range(2):                                   # the second call replays the captured graph
        torch.manual_seed(0)
        rollout = generate(model, proc, prompts, group_size=3, cfg=cfg)
        assert torch.allclose(teacher_forced(model, proc, rollout, cfg), rollout.logprobs, atol=1e-4)


@pytest.mark.parametrize("broken", ["capture", "replay"])
def test_a_failing_cuda_graph_falls_back_to_the_eager_static_path(tiny, monkeypatch, capsys, broken):
    """Forced on the CPU: the graph path fails, one warning line, and the samples are still
    right (log-probs equal teacher-forced ones); later calls go straight to the eager path."""
    import rollout
    from rollout import generate_static
    model, proc = tiny
    prompts = mixed_prompts(proc)
    cfg = SamplingConfig(max_new_tokens=8)
    monkeypatch.setattr(rollout, "_GRAPH_FAILURES", [])

    class BrokenGraph:
        def replay(self):
            raise RuntimeError("CUDA error: forced replay failure\nmore detail")

    def capture(*args):
        if broken == "capture":
            raise RuntimeError("CUDA error: forced capture failure")
        return BrokenGraph()
    monkeypatch.setattr(rollout, "_capture", capture)
    for _ in range(2):
        rollout_ = generate_static(model, proc, prompts, group_size=2, cfg=cfg, capture=True)
        assert torch.allclose(teacher_forced(model, proc, rollout_, cfg), rollout_.logprobs, atol=1e-4)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: CUDA graph decoding failed (CUDA error: forced")
    assert len(rollout._GRAPH_FAILURES) == 1            # the second call did not try the graph again


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_bf16_sampler_logprobs_stay_within_tolerance(tiny, device):
    """In bf16 the sampler's cached decode and the teacher-forced forward round differently.
    The bound: |Δ log π| ≤ 0.05, so the ratio ρ at step 0 stays within 1 ± 5%, far inside the
    clip (ε = 0.2). On CUDA this is the CUDA-graph path. (Measured on CPU: at most 0.008.)"""
    model, proc = tiny
    model = copy.deepcopy(model).to(device=device, dtype=torch.bfloat16)
    cfg = SamplingConfig(max_new_tokens=12)
    for seed in range(2):                                   # on CUDA the second call replays the graph
        torch.manual_seed(seed)
        rollout = generate(model, proc, mixed_prompts(proc), group_size=3, cfg=cfg)
        gap = (teacher_forced(model, proc, rollout, cfg) - rollout.logprobs).abs().max().item()
        assert gap <= 0.05, gap


@pytest.mark.parametrize("domain", ["text", "image", "video"])
def test_shared_prefill_logits_and_gradients_equal_the_full_forward(tiny, domain):
    """G rows of one prompt share its prefill (and its image or video encoding): the logits
    and the gradient they give equal one full forward per row."""
    from rollout import full_response_logits
    model, proc = tiny
    model = copy.deepcopy(model)
    exs = builtin_examples(domain, "train", 3, 0)
    exs[0].prompt += " Take care, please."                           # left padding for the others
    prompts = [encode_prompt(proc, e.prompt, e.image, e.video) for e in exs]
    rows = [p for p in prompts for _ in range(3)]
    response = torch.randint(5, 60, (len(rows), 7))
    grads = []
    for fn in (response_logits, full_response_logits):
        model.zero_grad()
        logits = fn(model, proc, rows, response)
        (logits.float().logsumexp(-1) * torch.linspace(0.5, 1.5, 7)).sum().backward()
        grads.append((logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5, rtol=1e-4)
