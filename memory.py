"""
Memory: what a run holds, and the options that make real models fit.

  - `memory_plan`, printed at start: every trained copy's weights, gradients and AdamW moments,
    every frozen copy's weights, the KV cache of the largest rollout batch (its bytes per token
    as the model itself reports them, so GPT-2, Falcon's multi-query or Gemma's head_dim count
    right).
  - `prepare_for_training`: gradient checkpointing and LoRA adapters on the language model's
    linear layers, found in the architecture itself (Llama's q_proj…down_proj, GPT-2's
    c_attn/c_proj/c_fc, Falcon's query_key_value…), never in the vision tower.
  - `clone_policy`: the copies every method trains share a frozen LoRA base, held once;
    `folded`: adapters folded into the weights before CoPD averages branches.
bf16 weights are load_policy's `dtype`.
"""

import copy
import re
import warnings

import torch

from policy import core, forward, new_cache, position_ids

VISION_PARTS = re.compile(r"(^|\.)(visual|vision_tower|vision_model|vision|multi_modal_projector|merger|connector)(\.|$)")
NOT_ADAPTED = {"lm_head", "embed_out", "score", "gate", "router", "shared_expert_gate"}   # the head, MoE routers


def lora_targets(model) -> list:
    """Leaf names of the language model's linear layers (nn.Linear, or GPT-2's Conv1D)."""
    from transformers.pytorch_utils import Conv1D
    return sorted({name.rsplit(".", 1)[-1] for name, m in core(model).named_modules()
                   if isinstance(m, (torch.nn.Linear, Conv1D)) and not VISION_PARTS.search(name)}
                  - NOT_ADAPTED)


def prepare_for_training(model, lora_rank: int = 0, grad_ckpt: bool = False):
    """π_0 as every method will copy it: with gradient checkpointing (activations recomputed in
    backward) and/or LoRA adapters of rank `lora_rank` on the language model's linear layers
    (the base frozen). LoRA needs peft, imported only here."""
    if grad_ckpt:   # transformers ≥ 5.2x renamed it (the old name warns)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora_rank:
        try:
            import peft
        except ImportError:
            raise ValueError("--lora-rank needs peft (pip install peft)") from None
        # peft still asks for the old name; the warning is theirs to fix, not the user's
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")   # GPT-2's Conv1D: peft sets it
        targets = lora_targets(model)
        if not targets:
            raise ValueError(f"--lora-rank: no linear layers found in {type(core(model)).__name__}")
        pattern = rf"^(?!.*{VISION_PARTS.pattern}).*\.({'|'.join(map(re.escape, targets))})$"
        config = peft.LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=pattern)
        model = peft.get_peft_model(model, config)
    return model


def clone_policy(model):
    """A trainable copy of `model` (an expert, a branch, a student). Frozen parameters (a LoRA
    base) stay shared with `model`: K LoRA experts hold the base weights once."""
    shared = {id(p): p for p in model.parameters() if not p.requires_grad}   # deepcopy's memo: not copied
    return copy.deepcopy(model, shared)


def folded(model):
    """A plain transformers model with any LoRA adapters folded into its weights (a copy):
    what merging or saving a LoRA expert needs, since averaging A and B apart is not
    averaging their product."""
    if not hasattr(model, "merge_and_unload"):
        return model
    return copy.deepcopy(model).merge_and_unload()


# -----------------------------------------------------------------------------
# the plan printed at start

def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache one token takes, as the model reports it: what a two-token forward
    leaves in its cache, halved (works on the meta device too, for models too big to hold)."""
    device = next(model.parameters()).device
    ids = torch.ones(1, 2, dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    with torch.no_grad():   # no attention mask: nothing to mask, and the meta device cannot check one
        _, cache = forward(model, ids, None, position_ids(model, ids, mask, {}), cache=new_cache(model))
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)) // 2


def _size(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{int(n_bytes)} B"
        n_bytes /= 1024


def memory_plan(model0, method: str, K: int, copies: tuple, rows: int, tokens: int, per_rank: bool = False) -> str:
    """An estimate, from the sizes, of what `method` holds at its peak with `copies` = (trained,
    frozen) model copies (config.METHODS; frozen: π_0, kept for the evals, and finished experts
    or teachers): every trained copy's weights, gradients and two AdamW moments; every frozen
    copy's weights (a LoRA base is shared by all copies: held once); the KV cache of the
    largest rollout batch (`rows` x `tokens`).
    Not counted: the activations of backward (they scale with --micro-batch; --grad-ckpt cuts
    them). `per_rank`: under torchrun, one branch per rank."""
    params = list(model0.parameters())
    own = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    shared = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
    trained, frozen = (1, 1) if per_rank else copies
    per_row = kv_bytes_per_token(model0) * tokens
    parts = [("trained copy: weights, gradients, AdamW", 4 * own, trained),
             ("frozen copy (π_0, experts, teachers)", own, frozen),
             (f"KV cache: {rows} rows x {tokens} tokens", per_row * rows, 1)]
    if shared:
        parts.insert(0, ("LoRA base (frozen, shared)", shared, 1))
    total = sum(each * n for _, each, n in parts)
    lines = [f"Memory plan (--method {method}, {K} experts, {params[0].dtype}" + (", per rank" if per_rank else "")
             + "):", "| part | each | copies | total |", "|---|---|---|---|"]
    lines += [f"| {name} | {_size(each)} | {n} | {_size(each * n)} |" for name, each, n in parts]
    lines.append(f"| all (without backward's activations) | | | {_size(total)} |")
    return "\n".join(lines)
