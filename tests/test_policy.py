import numpy as np
import pytest
import torch

from policy import (Processor, build_tokenizer, collate, encode_prompt, forward, load_policy, patchify, position_ids, prompt_of,
                    prompt_positions, save_policy)
from rollout import SamplingConfig, generate, response_logits, sampling_logprobs, token_logprobs
from tasks import builtin_examples


def test_tokenizer_round_trip_and_special_tokens():
    tok = build_tokenizer()
    text = "<|im_start|>user\nCompute 3+4.<|im_end|>\n<answer>7</answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
              "<|video_pad|>", "<answer>"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    assert tok.eos_token == "<|im_end|>"


def test_patchify_follows_qwen2_vl_patch_order():
    proc = Processor(tokenizer=None, patch_size=2, merge_size=2, temporal_patch_size=2,
                     image_mean=(0, 0, 0), image_std=(1, 1, 1))
    img = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    pv, grid = patchify(torch.as_tensor(img)[None], proc)
    assert grid.tolist() == [1, 4, 4] and pv.shape == (16, 3 * 2 * 2 * 2)
    # the first merge block is the top-left 2x2 of patches, row-major; a patch is (C, t, p, p)
    x = torch.as_tensor(img).float().permute(2, 0, 1) / 255
    second = pv[1].view(3, 2, 2, 2)
    assert torch.allclose(second[:, 0], x[:, 0:2, 2:4]) and torch.allclose(second[:, 1], x[:, 0:2, 2:4])
    third = pv[2].view(3, 2, 2, 2)                      # second patch row of the first block
    assert torch.allclose(third[:, 0], x[:, 2:4, 0:2])
    fifth = pv[4].view(3, 2, 2, 2)                      # the next merge block, to the right
    assert torch.allclose(fifth[:, 0], x[:, 0:2, 4:6])


def test_patchify_matches_transformers_image_processor():
    pytest.importorskip("torchvision", reason="transformers' Qwen2-VL image processor needs torchvision")
    from transformers import Qwen2VLImageProcessor
    hf = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16, max_pixels=4096)
    proc = Processor(tokenizer=None, patch_size=4, merge_size=2, temporal_patch_size=2)
    rng = np.random.default_rng(0)
    for h, w in ((16, 16), (24, 32)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = hf(images=[img], return_tensors="pt")
        ours, grid = patchify(torch.as_tensor(img)[None], proc)
        assert grid.tolist() == ref["image_grid_thw"][0].tolist()
        assert torch.allclose(ours, ref["pixel_values"].float(), atol=1e-4)


def test_save_and_load_round_trip(tiny, tmp_path):
    model, proc = tiny
    save_policy(model, proc, str(tmp_path))
    model2, proc2 = load_policy(str(tmp_path))
    assert type(model2) is type(model)
    assert (proc2.eos_ids, proc2.pad_id, proc2.image_id, proc2.video_id, proc2.patch_size) == \
           (proc.eos_ids, proc.pad_id, proc.image_id, proc.video_id, proc.patch_size)
    exs = builtin_examples("image", "train", 2, 0) + builtin_examples("video", "train", 1, 0)
    prompts = [encode_prompt(proc2, e.prompt, e.image, e.video) for e in exs]
    b = collate(prompts, proc.pad_id)
    pos = position_ids(model, b.input_ids, b.attention_mask, b.vision)
    with torch.no_grad():
        a, _ = forward(model, b.input_ids, b.attention_mask, pos, vision=b.vision)
        c, _ = forward(model2, b.input_ids, b.attention_mask, pos, vision=b.vision)
    assert torch.allclose(a, c, atol=1e-5)


def test_left_padding_does_not_change_a_prompts_output(tiny):
    model, proc = tiny
    exs = builtin_examples("video", "train", 1, 0) + builtin_examples("text", "train", 1, 0)
    exs[1].prompt = "Compute " + "+".join("1" * 40) + "."          # much longer: the video gets padded
    prompts = [encode_prompt(proc, e.prompt, e.image, e.video) for e in exs]
    alone = generate(model, proc, prompts[:1], 1, SamplingConfig(max_new_tokens=5), greedy=True)
    padded = generate(model, proc, prompts, 1, SamplingConfig(max_new_tokens=5), greedy=True)
    assert torch.equal(alone.response[0], padded.response[0])
    assert torch.allclose(alone.logprobs[0], padded.logprobs[0], atol=1e-4)


def test_kept_prompt_positions_equal_the_rope_index_of_every_batch(tiny):
    """Positions computed once per prompt and reassembled: the same as transformers' rope index
    of each batch, whatever the rows around a prompt and however much padding it gets; a copy
    shares them, and a model of another class gets its own."""
    import copy
    model, proc = tiny
    exs = builtin_examples("video", "train", 1, 0) + builtin_examples("image", "train", 2, 0) + builtin_examples("text", "train", 2, 0)
    prompts = [encode_prompt(proc, e.prompt, e.image, e.video) for e in exs]
    for batch_prompts in (prompts, prompts[3:] + prompts[1:2] * 2, [copy.copy(prompts[2]), prompts[0], prompts[4]]):
        b = collate(batch_prompts, proc.pad_id)
        expected = position_ids(model, b.input_ids, b.attention_mask, b.vision)
        kept = prompt_positions(model, batch_prompts, b)
        real = b.attention_mask.bool()
        assert kept.shape == expected.shape and torch.equal(kept[:, real], expected[:, real])
    assert copy.copy(prompts[1]).positions is prompts[1].positions     # a copy reads the kept ones
    # a text-only model of another class: (B, L) positions of its own beside the (3, B, L) ones
    from transformers import LlamaConfig, LlamaForCausalLM
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(proc.tokenizer), hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, intermediate_size=32))
    b = collate(prompts[3:], proc.pad_id)
    assert torch.equal(prompt_positions(lm, prompts[3:], b), position_ids(lm, b.input_ids, b.attention_mask, {}))
    assert prompts[3].positions[type(lm)].dim() == 1 and prompts[3].positions[type(model)].dim() == 2


def test_an_example_encoded_ahead_is_drawn_as_a_copy_of_its_prompt(tiny):
    """prompt_of: a fresh encoding without `encoded`; with it, a new Prompt object each draw
    (response_logits tells draws apart by object) that shares the ids, pixels and positions."""
    _, proc = tiny
    ex = builtin_examples("image", "train", 1, 0)[0]
    fresh = prompt_of(proc, ex)
    assert fresh.ids == encode_prompt(proc, ex.prompt, ex.image).ids
    ex.encoded = fresh
    a, b = prompt_of(proc, ex), prompt_of(proc, ex)
    assert a is not b and a is not fresh
    assert a.ids is fresh.ids and a.pixel_values is fresh.pixel_values and a.positions is fresh.positions


class _Output(dict):
    logits = property(lambda self: self["logits"])


class _OldStyleLM(torch.nn.Module):
    """A model whose forward still takes (and returns) `past_key_values`."""
    config = None

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, logits_to_keep=0):
        self.seen = past_key_values
        return _Output(logits=torch.zeros(1, 1, 3), past_key_values="new-cache")


def test_forward_uses_the_cache_keyword_the_model_takes(tiny):
    old = _OldStyleLM()
    logits, cache = forward(old, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1), None, cache="old-cache")
    assert old.seen == "old-cache" and cache == "new-cache"
    model, _ = tiny                      # the installed transformers: whichever name it takes
    from policy import new_cache
    ids = torch.tensor([[5, 6, 7]])
    _, cache = forward(model, ids, torch.ones_like(ids), torch.arange(3)[None].expand(3, 1, 3), cache=new_cache(model))
    assert cache.get_seq_length() == 3


# every causal-LM family a user is likely to bring, each as small as it can be built; the ones
# with something of their own to exercise: sliding-window attention shorter than the sequence
# (mistral, gemma2, gemma3_text), MoE routing (qwen2_moe, qwen3_moe: 2 of 4 experts per token),
# learned absolute positions (gpt2), multi-query attention (falcon), partial rotary (phi, stablelm)
SMALL_LM = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=64)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
TEXT_FAMILIES = {
    "llama": SMALL_LM, "qwen2": SMALL_LM, "mistral": dict(SMALL_LM, sliding_window=8), "phi3": SMALL_LM,
    "phi": SMALL_LM, "gemma": dict(SMALL_LM, head_dim=16), "gemma2": dict(SMALL_LM, head_dim=16, sliding_window=8),
    "gemma3_text": dict(SMALL_LM, head_dim=16, sliding_window=8), "olmo2": SMALL_LM, "smollm3": SMALL_LM,
    "qwen2_moe": dict(SMALL_LM, **MOE, shared_expert_intermediate_size=32),
    "qwen3_moe": dict(SMALL_LM, **MOE, head_dim=16), "stablelm": SMALL_LM,
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=256),
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, multi_query=True),
}


def tiny_causal_lm(family: str, tokenizer):
    """A random-init causal LM of `family` for our tokenizer, its embedding table padded past it."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer) + 6, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
                                  **TEXT_FAMILIES[family])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def save_tiny_causal_lm(family: str, path) -> str:
    tok = build_tokenizer()
    tiny_causal_lm(family, tok).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("family", list(TEXT_FAMILIES))
def test_every_text_family_loads_and_samples_consistently(family, tmp_path):
    """Saved by transformers, loaded by load_policy: our sampler's log-probs equal a
    teacher-forced forward's, left padding included, and no id past the tokenizer is sampled."""
    tok = build_tokenizer()
    model2, proc = load_policy(save_tiny_causal_lm(family, tmp_path))
    assert not proc.is_vl and proc.vocab_size == len(tok) and model2.config.model_type == family
    exs = builtin_examples("text", "train", 3, 0)
    exs[0].prompt = "Compute 1+2+3+4+5+6+7+8+9, carefully, please."   # left padding for the others
    prompts = [encode_prompt(proc, e.prompt) for e in exs]
    if family in ("mistral", "gemma2", "gemma3_text"):
        assert model2.config.sliding_window < min(len(p.ids) for p in prompts)   # the window really cuts
    cfg = SamplingConfig(max_new_tokens=12)
    torch.manual_seed(0)
    r = generate(model2, proc, prompts, 2, cfg)
    assert int(r.response.max()) < len(tok)
    with torch.no_grad():
        lp = token_logprobs(sampling_logprobs(response_logits(model2, proc, r.prompts, r.response), cfg, proc),
                            r.response) * r.mask
    assert torch.allclose(lp, r.logprobs, atol=1e-4)
    with pytest.raises(ValueError, match="text-only"):
        encode_prompt(proc, "x", image=np.zeros((16, 16, 3), np.uint8))


def tiny_smolvlm_checkpoint(path) -> str:
    """SmolVLM's architecture (Idefics3: a SigLIP-style tower and a Llama), random-init."""
    from transformers import AutoModelForImageTextToText, Idefics3Config
    tok = build_tokenizer()
    config = Idefics3Config(text_config=dict(model_type="llama", vocab_size=len(tok) + 6, **SMALL_LM,
                                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
                            vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=32, image_size=32, patch_size=8),
                            scale_factor=2, image_token_id=5)
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def tiny_vl_checkpoint(arch: str, path):
    """A random-init Qwen2-VL / Qwen2.5-VL / Qwen3-VL with our tokenizer, saved as a checkpoint."""
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig
    from policy import SPECIAL_TOKENS
    tok = build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    text = dict(vocab_size=len(tok) + 8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, intermediate_size=128, eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"],
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 6, 6]))
    vision = dict(depth=1, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    if arch == "qwen3_vl":
        text["rope_parameters"]["mrope_interleaved"] = True
        config = Qwen3VLConfig(text_config=dict(text, head_dim=32), vision_config=dict(
            vision, hidden_size=32, intermediate_size=64, out_hidden_size=64, deepstack_visual_indexes=[0],
            num_position_embeddings=64), **tokens)
    elif arch == "qwen2_vl":
        config = Qwen2VLConfig(text_config=text, vision_config=dict(vision, embed_dim=32, hidden_size=64, mlp_ratio=2),
                               **tokens)
    else:
        config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(
            vision, hidden_size=32, intermediate_size=64, out_hidden_size=64, fullatt_block_indexes=[0],
            window_size=16), **tokens)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_vl_checkpoints_sample_consistently_on_text_image_and_video(arch, tmp_path):
    model, proc = load_policy(tiny_vl_checkpoint(arch, tmp_path))
    assert proc.is_vl and proc.vocab_size < model.get_output_embeddings().weight.shape[0]
    exs = (builtin_examples("text", "train", 2, 0) + builtin_examples("image", "train", 2, 0)
           + builtin_examples("video", "train", 2, 0))
    prompts = [encode_prompt(proc, e.prompt, e.image, e.video) for e in exs]
    cfg = SamplingConfig(max_new_tokens=8)
    torch.manual_seed(0)
    r = generate(model, proc, prompts, 2, cfg)
    assert int(r.response.max()) < proc.vocab_size
    with torch.no_grad():
        lp = token_logprobs(sampling_logprobs(response_logits(model, proc, r.prompts, r.response), cfg, proc),
                            r.response) * r.mask
    assert torch.allclose(lp, r.logprobs, atol=1e-4)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gpt2", "qwen2_moe", "falcon"])
def test_shared_prefill_scoring_equals_the_full_forward_on_other_families(family, tmp_path):
    """Sliding windows, learned positions, routing, multi-query: the trainer's shared-prefill
    logits equal one full forward per row."""
    from rollout import full_response_logits
    model, proc = load_policy(save_tiny_causal_lm(family, tmp_path))
    exs = builtin_examples("text", "train", 2, 0)
    exs[0].prompt = "Compute 1+2+3+4+5+6+7+8+9, carefully, please."
    rows = [p for p in (encode_prompt(proc, e.prompt) for e in exs) for _ in range(3)]
    response = torch.randint(5, 60, (6, 9))
    with torch.no_grad():
        assert torch.allclose(response_logits(model, proc, rows, response),
                              full_response_logits(model, proc, rows, response), atol=1e-5)
