import pytest
import torch

from config import METHODS
from memory import kv_bytes_per_token, lora_targets, memory_plan, prepare_for_training
from policy import encode_prompt
from rollout import response_logits
from tasks import builtin_examples


def on_meta(config_cls, model_cls, dtype=torch.bfloat16, **shape):
    """A published model's shapes on the meta device: sizes without memory."""
    with torch.device("meta"):
        return model_cls(config_cls(**shape)).to(dtype)


def llama_2_7b():
    """Llama-2-7B: 6,738,415,616 parameters; its KV cache is 0.5 MiB per token in 16-bit
    (2 · 32 layers · 32 heads · 128 dims · 2 bytes), 2 GiB at its 4k context."""
    from transformers import LlamaConfig, LlamaForCausalLM
    return on_meta(LlamaConfig, LlamaForCausalLM, vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)


def test_kv_cache_bytes_per_token_match_published_models():
    from transformers import FalconConfig, FalconForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    assert kv_bytes_per_token(llama_2_7b()) == 512 * 1024
    # Mistral-7B: grouped-query attention with 8 KV heads: 128 KiB per token
    mistral = on_meta(LlamaConfig, LlamaForCausalLM, vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
    assert kv_bytes_per_token(mistral) == 128 * 1024
    # Falcon-7B (its config's defaults): multi-query, one KV head of 64 dims over 32 layers: 8 KiB
    assert kv_bytes_per_token(on_meta(FalconConfig, FalconForCausalLM)) == 8 * 1024
    # GPT-2 small: 12 layers x 768 dims, no num_key_value_heads attribute: 36 KiB in 16-bit
    assert kv_bytes_per_token(on_meta(GPT2Config, GPT2LMHeadModel, dtype=torch.float16)) == 36 * 1024


def test_memory_plan_of_llama_2_7b_in_bf16():
    model = llama_2_7b()
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616
    plan = memory_plan(model, "copd", 2, METHODS["copd"].copies(2), rows=1, tokens=4096)
    weights = "12.6 GiB"                          # 6.74e9 · 2 bytes
    assert METHODS["copd"].copies(2) == (2, 1) and METHODS["all"].copies(3) == (3, 4)
    assert "| trained copy: weights, gradients, AdamW | 50.2 GiB | 2 | 100.4 GiB |" in plan
    assert f"| frozen copy (π_0, experts, teachers) | {weights} | 1 | {weights} |" in plan
    assert "| KV cache: 1 rows x 4096 tokens | 2.0 GiB | 1 | 2.0 GiB |" in plan
    assert "| all (without backward's activations) | | | 115.0 GiB |" in plan


def test_lora_targets_are_found_in_the_architecture(tiny):
    from test_policy import tiny_causal_lm
    from policy import build_tokenizer
    tok = build_tokenizer()
    assert lora_targets(tiny_causal_lm("gpt2", tok)) == ["c_attn", "c_fc", "c_proj"]
    assert lora_targets(tiny_causal_lm("llama", tok)) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                          "up_proj", "v_proj"]
    assert "gate" not in lora_targets(tiny_causal_lm("qwen2_moe", tok))          # the router stays as it is
    model, _ = tiny                                                             # Qwen2.5-VL: its LM only
    assert lora_targets(model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_lora_copies_share_the_frozen_base_and_fold_back_exactly(tiny):
    pytest.importorskip("peft")
    import copy as copy_
    from memory import clone_policy, folded, prepare_for_training
    model, proc = tiny
    lora = prepare_for_training(copy_.deepcopy(model), lora_rank=4)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and "visual" not in n for n in trainable)
    clone = clone_policy(lora)
    for (name, a), b in zip(lora.named_parameters(), clone.parameters()):
        assert (a is b) == (name not in trainable)       # base shared, adapters copied
    with torch.no_grad():
        for n, p in clone.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)                         # B = 0 at init: make the adapter matter
    ex = builtin_examples("image", "train", 2, 0)
    prompts = [encode_prompt(proc, e.prompt, e.image) for e in ex]
    response = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with torch.no_grad():
        want = response_logits(clone, proc, prompts, response)
        plain = folded(clone)
        got = response_logits(plain, proc, prompts, response)
    assert not hasattr(plain, "merge_and_unload")
    assert torch.allclose(got, want, atol=1e-5)
    assert any(p.requires_grad for p in clone.parameters())      # folding copied: the clone still trains


@pytest.mark.parametrize("family", list(__import__("test_policy").TEXT_FAMILIES))
def test_lora_trains_the_adapters_of_every_text_family(family):
    """--lora-rank on each family: adapters on the layers lora_targets found, the base frozen,
    and one GRPO update moves the adapters only."""
    pytest.importorskip("peft")
    from test_policy import tiny_causal_lm
    from policy import build_tokenizer, make_processor
    from rlvr import RLConfig, rlvr_step
    from rollout import SamplingConfig
    tok = build_tokenizer()
    model = tiny_causal_lm(family, tok)
    targets = set(lora_targets(model))
    model = prepare_for_training(model, lora_rank=2)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == targets
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rl = RLConfig(prompts_per_step=2, group_size=4, sampling=SamplingConfig(max_new_tokens=4))
    with torch.no_grad():   # B = 0 at init would make A's gradient 0: start from a non-zero adapter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.manual_seed(0)
    rlvr_step(model, opt, make_processor(tok, model), builtin_examples("text", "train", 2, 0), rl)
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], p) for n, p in frozen.items())
    assert any(not torch.equal(now[n], p) for n, p in trainable.items())
