"""
The policy π: a vision-language model, its tokenizer, and how prompts, images and videos
become its inputs.

The default is transformers' Qwen2_5_VLForConditionalGeneration (the paper's model family)
built from a tiny config with random init, plus our own character-level tokenizer that carries
Qwen's chat and vision special tokens. `load_policy(NAME_OR_PATH)` loads a real checkpoint
instead (Qwen2-VL / Qwen2.5-VL / Qwen3-VL, or any causal LM for text-only runs).

Everything model-specific lives here, in one place:
  - the forward keyword for the KV cache (`past_key_values` up to transformers ~5.20,
    `cache` after);
  - position ids: M-RoPE models get theirs from the model's own `get_rope_index`, text
    models get `cumsum(mask) - 1`, so left padding never shifts a row's positions;
  - `mm_token_type_ids` (text 0, image 1, video 2), which newer Qwen-VL forwards ask for.
"""

import copy
import functools
import inspect
import json
import os
import string
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import transformers

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Qwen2-VL's image processor defaults
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# -----------------------------------------------------------------------------
# the tiny default: tokenizer and model config

def build_tokenizer():
    """Character-level tokenizer with Qwen's special tokens; `<answer>`, `</answer>` and the
    chat roles are single tokens, so the tiny policy's answers are a handful of tokens long."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0}
    for ch in string.printable:
        if ch not in "\t\r\x0b\x0c":
            vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: characters
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    # whole-word tokens for the chat roles and the answer tags, as a real BPE vocabulary would
    # have: the tiny policy's sequences get shorter, so CPU steps get faster
    tok.add_tokens([AddedToken(w, normalized=False) for w in ("<answer>", "</answer>", "user", "assistant")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@dataclass
class TinyConfig:
    """Shape of the default random-init Qwen2.5-VL. The vision tower sees 4x4-pixel patches,
    merged 2x2, so a 16x16 image becomes 4 tokens of the language model."""
    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 3
    num_kv_heads: int = 1
    intermediate_size: int = 288
    vision_hidden_size: int = 64
    vision_depth: int = 2
    vision_heads: int = 4
    patch_size: int = 4
    merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 32              # pixels: ≥ the picture, so every vision block sees the whole frame


def build_tiny_policy(tokenizer, cfg: TinyConfig = TinyConfig(), seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = cfg.hidden_size // cfg.num_heads
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
            intermediate_size=cfg.intermediate_size, max_position_embeddings=2048,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                 mrope_section=[head_dim // 8, head_dim // 8 * 3 // 2, head_dim // 8 * 3 // 2]),
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=cfg.vision_depth, hidden_size=cfg.vision_hidden_size, num_heads=cfg.vision_heads,
            intermediate_size=2 * cfg.vision_hidden_size, out_hidden_size=cfg.hidden_size,
            patch_size=cfg.patch_size, spatial_merge_size=cfg.merge_size,
            temporal_patch_size=cfg.temporal_patch_size,
            window_size=cfg.window_size, fullatt_block_indexes=[cfg.vision_depth - 1],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    return model.float().eval()


# -----------------------------------------------------------------------------
# the processor: tokenizer + how pixels become patches

@dataclass
class Processor:
    tokenizer: object
    is_vl: bool = True
    patch_size: int = 4
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    eos_ids: list = field(default_factory=list)   # every id that ends a response
    pad_id: int = 0
    image_id: int = -1
    video_id: int = -1
    frame_timestamps: bool = False   # Qwen3-VL: each temporal patch is its own "<t seconds>" block

    @property
    def vocab_size(self):
        """Ids at or past this were never trained (checkpoints pad their embedding tables)."""
        return len(self.tokenizer)


VISION_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")   # whose image and video inputs patchify builds


def make_processor(tokenizer, model, preprocessor_config: dict | None = None):
    """Reads special-token ids from the tokenizer and the model config, never hard-coded. Another
    vision-language family (SmolVLM, LLaVA, …) gets a text-only processor."""
    cfg = model.config
    vision = getattr(cfg, "vision_config", None)
    pre = preprocessor_config or {}
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [] if gen_eos is None else [gen_eos])
    if "<|im_end|>" in tokenizer.get_vocab():  # chat models end a turn here even if eos says otherwise
        eos.add(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    return Processor(
        tokenizer=tokenizer, is_vl=vision is not None and getattr(cfg, "model_type", "") in VISION_FAMILIES,
        patch_size=pre.get("patch_size", getattr(vision, "patch_size", 14)),
        merge_size=pre.get("merge_size", getattr(vision, "spatial_merge_size", 2)),
        temporal_patch_size=pre.get("temporal_patch_size", getattr(vision, "temporal_patch_size", 2)),
        image_mean=tuple(pre.get("image_mean", CLIP_MEAN)), image_std=tuple(pre.get("image_std", CLIP_STD)),
        eos_ids=sorted(eos), pad_id=pad,
        image_id=getattr(cfg, "image_token_id", -1), video_id=getattr(cfg, "video_token_id", -1),
        frame_timestamps=getattr(cfg, "model_type", "").startswith("qwen3"),
    )


def patchify(frames: torch.Tensor, proc: Processor):
    """Cut frames (T, H, W, 3) uint8 into Qwen2-VL patches: returns (N, 3·tp·p·p) floats and the
    grid (t, h, w). H and W are resized to multiples of patch·merge; T is padded to a multiple
    of the temporal patch by repeating the last frame (what Qwen2-VL's processor does)."""
    p, m, tp = proc.patch_size, proc.merge_size, proc.temporal_patch_size
    x = frames.float().permute(0, 3, 1, 2) / 255.0                       # (T, 3, H, W)
    T, C, H, W = x.shape
    unit = p * m
    h2, w2 = max(unit, round(H / unit) * unit), max(unit, round(W / unit) * unit)
    if (h2, w2) != (H, W):
        x = F.interpolate(x, size=(h2, w2), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor(proc.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
    x = (x - mean) / std
    if T % tp:
        x = torch.cat([x, x[-1:].expand(tp - T % tp, -1, -1, -1)])
    gt, gh, gw = x.shape[0] // tp, h2 // p, w2 // p
    x = x.reshape(gt, tp, C, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)                             # Qwen2-VL's patch order
    return x.reshape(gt * gh * gw, C * tp * p * p), torch.tensor([gt, gh, gw])


# -----------------------------------------------------------------------------
# prompts: one encoded prompt, and a left-padded batch of them

@dataclass
class Prompt:
    ids: list
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    # its rope positions for each model class, filled on first use by `prompt_positions`; a
    # copy (copy.copy) shares this dict, so every copy of a prompt fills it once for all
    positions: dict = field(default_factory=dict)


def encode_prompt(proc: Processor, text: str, image=None, video=None) -> Prompt:
    """Chat-formatted prompt; an image (H, W, 3) or a video (T, H, W, 3) goes before the text
    as <|vision_start|> + one pad token per merged patch + <|vision_end|>."""
    tok = proc.tokenizer
    prompt = Prompt(ids=[])
    vision = ""
    if image is not None or video is not None:
        if not proc.is_vl:
            raise ValueError("this model is text-only, but the prompt has an image or a video")
        frames = torch.as_tensor(np.asarray(image if image is not None else video))
        if image is not None:
            pv, grid = patchify(frames[None], proc)
            prompt.pixel_values, prompt.image_grid_thw = pv, grid[None]
            pad = "<|image_pad|>"
        else:
            pv, grid = patchify(frames, proc)
            prompt.pixel_values_videos, prompt.video_grid_thw = pv, grid[None]
            pad = "<|video_pad|>"
        per_frame = int(grid[1] * grid[2]) // proc.merge_size ** 2
        block = "<|vision_start|>" + pad * per_frame + "<|vision_end|>"
        if video is not None and proc.frame_timestamps:   # 1 frame per second, as our tasks
            seconds = [i * proc.temporal_patch_size + (proc.temporal_patch_size - 1) / 2 for i in range(int(grid[0]))]
            vision = "".join(f"<{s:.1f} seconds>" + block for s in seconds)
        else:
            vision = "<|vision_start|>" + pad * (int(grid.prod()) // proc.merge_size ** 2) + "<|vision_end|>"
    messages = [{"role": "user", "content": vision + text}]
    if tok.chat_template:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt.ids = tok(ids, add_special_tokens=False)["input_ids"]
    else:  # a base LM without a template
        prompt.ids = tok(vision + text + "\n", add_special_tokens=False)["input_ids"]
    return prompt


def prompt_of(proc: Processor, example) -> Prompt:
    """The policy's input for a tasks.Example: a copy of the prompt encoded ahead of time
    (`example.encoded`: run.py encodes the built-in pools once) or a fresh encoding. A copy,
    because response_logits tells one draw's rows from another draw of the same example by
    the Prompt object; copies share the token ids, the pixels and the kept positions."""
    if example.encoded is None:
        return encode_prompt(proc, example.prompt, example.image, example.video)
    return copy.copy(example.encoded)


@dataclass
class PromptBatch:
    input_ids: torch.Tensor          # (B, L), left-padded
    attention_mask: torch.Tensor     # (B, L)
    vision: dict                     # pixel_values(_videos), image/video_grid_thw, where present

    def to(self, device):
        return PromptBatch(self.input_ids.to(device), self.attention_mask.to(device),
                           {k: v.to(device) for k, v in self.vision.items()})


def collate(prompts: list, pad_id: int) -> PromptBatch:
    L = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p.ids):] = torch.tensor(p.ids)
        mask[i, L - len(p.ids):] = 1
    vision = {}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [getattr(p, key) for p in prompts if getattr(p, key) is not None]
        if parts:
            vision[key] = torch.cat(parts)
    return PromptBatch(ids, mask, vision)


# -----------------------------------------------------------------------------
# the forward pass, with every version and architecture difference handled here

def core(model):
    """The transformers model itself: a LoRA (peft) wrapper injects its adapters into it."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _accepts(model, name):
    return name in _forward_parameters(type(core(model)))


@functools.cache
def _forward_parameters(model_class) -> frozenset:
    """The keywords a model class's forward takes: read once per class, not per forward."""
    return frozenset(inspect.signature(model_class.forward).parameters)


def mm_token_type_ids(model, input_ids):
    cfg = core(model).config
    types = torch.zeros_like(input_ids, dtype=torch.int)
    types[input_ids == getattr(cfg, "image_token_id", -1)] = 1
    types[input_ids == getattr(cfg, "video_token_id", -1)] = 2
    return types


def position_ids(model, input_ids, attention_mask, vision):
    """Positions that start at each row's first real token. M-RoPE models: (3, B, L) from the
    model's own rope index; text models: (B, L)."""
    inner = getattr(core(model), "model", None)
    if hasattr(inner, "get_rope_index"):
        videos = vision.get("video_grid_thw")
        pos, _ = inner.get_rope_index(
            input_ids, mm_token_type_ids=mm_token_type_ids(model, input_ids),
            image_grid_thw=vision.get("image_grid_thw"), video_grid_thw=videos,
            # one entry per video (the default runs out past seq-length videos); 1 s per grid
            second_per_grid_ts=None if videos is None else torch.ones(len(videos)),
            attention_mask=attention_mask)
        return pos
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def prompt_positions(model, prompts: list, batch: PromptBatch) -> torch.Tensor:
    """`position_ids` of `batch`, the left-padded collation of `prompts`, each prompt's row
    computed once and kept on it (`Prompt.positions`): transformers' rope index is a Python loop
    over rows, and a prompt is collated again at every step that samples, scores or evaluates
    it. A row's positions skip its padding, so they do not depend on the rest of the batch;
    padding gets 0, as the rope index gives it. Kept and assembled on the CPU, then moved at once."""
    kind = type(core(model))
    unseen = list({id(p): p for p in prompts if kind not in p.positions}.values())
    if unseen:
        fresh = collate(unseen, pad_id=0).to(batch.input_ids.device)   # any pad id: positions skip padding
        pos = position_ids(model, fresh.input_ids, fresh.attention_mask, fresh.vision).cpu()
        for i, p in enumerate(unseen):
            p.positions[kind] = pos[..., i, pos.shape[-1] - len(p.ids):].clone()
    L = batch.input_ids.shape[1]
    first = prompts[0].positions[kind]
    out = torch.zeros(first.shape[:-1] + (len(prompts), L), dtype=first.dtype)
    for i, p in enumerate(prompts):
        out[..., i, L - len(p.ids):] = p.positions[kind]
    return out.to(batch.input_ids.device)


def forward(model, input_ids, attention_mask, positions, cache=None, vision=None, logits_to_keep=0):
    """One forward; returns (logits, cache). `cache` is None for a teacher-forced pass."""
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                  use_cache=cache is not None, logits_to_keep=logits_to_keep)
    if vision:
        kwargs.update(vision)
        if _accepts(model, "mm_token_type_ids"):
            kwargs["mm_token_type_ids"] = mm_token_type_ids(model, input_ids)
    # transformers renamed `past_key_values` to `cache` (in the forward and in its output)
    cache_kw = "cache" if _accepts(model, "cache") else "past_key_values"
    if cache is not None:
        kwargs[cache_kw] = cache
    out = core(model)(**kwargs)
    return out.logits, out.get(cache_kw)


def new_cache(model):
    from transformers import DynamicCache
    return DynamicCache(config=core(model).config)


# -----------------------------------------------------------------------------
# loading and saving

def load_policy(name_or_path: str, dtype=torch.float32, device="cpu"):
    """A real checkpoint by hub name or local path, with its own tokenizer, chat template and
    image settings. Returns (model, processor). Vision-language configs load as image-text-to-
    text models, anything else as a causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
    _hf_bars_on_terminals_only()
    config = AutoConfig.from_pretrained(name_or_path)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    model = auto.from_pretrained(name_or_path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    template = _checkpoint_file(name_or_path, "chat_template.jinja")
    if not tokenizer.chat_template and template:
        tokenizer.chat_template = open(template).read()
    pre = None
    pre_file = _checkpoint_file(name_or_path, "preprocessor_config.json")
    if pre_file:
        with open(pre_file) as f:
            pre = json.load(f)
    return model, make_processor(tokenizer, model, pre)


def _hf_bars_on_terminals_only():
    if not sys.stderr.isatty():   # transformers' loading and saving bars, in a log file, are noise
        transformers.utils.logging.disable_progress_bar()


def _checkpoint_file(name_or_path: str, filename: str):
    """One file of a checkpoint (a folder, or a hub name: the hub cache), or None if it has none."""
    return transformers.utils.cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False,
                                          _raise_exceptions_for_connection_errors=False)


def save_policy(model, proc: Processor, path: str):
    """HF format: `load_policy(path)` (or any transformers user) reads it back."""
    _hf_bars_on_terminals_only()
    model.save_pretrained(path)
    proc.tokenizer.save_pretrained(path)
    if proc.is_vl:
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump(dict(patch_size=proc.patch_size, merge_size=proc.merge_size,
                           temporal_patch_size=proc.temporal_patch_size,
                           image_mean=list(proc.image_mean), image_std=list(proc.image_std)), f, indent=1)
