"""
Benchmarks: our sampler against HF `generate` on the same weights, prompts, lengths and
sampling settings, beside the weight+KV bandwidth floor; and where the time of one CoPD
Phase II step goes (rollout, teacher scoring, backward, optimizer).

    python bench.py --device cpu --json out.json
    python bench.py --device cuda --json gpu.json

`--json PATH` writes a list of rows: one per sampler measurement, each with
`speedup_vs_hf_generate`, then one per piece of the CoPD step (`"kind": "copd_step"`).
Speed is measured here, never in the tests.
"""

import argparse
import copy
import json
import time
from dataclasses import replace

import torch

from policy import Prompt, TinyConfig, build_tiny_policy, build_tokenizer, make_processor
from rollout import SamplingConfig, generate

SHAPES = {
    # the default tiny policy, and a Qwen2-0.5B-shaped language model (random init)
    "tiny": TinyConfig(),
    "qwen2-0.5b": TinyConfig(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864),
}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeats=1):
    fn()                                     # warm-up (and CUDA-graph capture where used)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def measure_bandwidth(device) -> float:
    """Bytes/s of a large on-device copy: the memory-bandwidth ceiling for decoding."""
    n = (1 << 28) if device.startswith("cuda") else (1 << 25)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    seconds = timed(lambda: b.copy_(a), device, repeats=5)
    return 2 * n / seconds


def bench_sampler(name, device, dtype, batch, prompt_len, new_tokens, bandwidth, repeats):
    tok = build_tokenizer()
    model = build_tiny_policy(tok, SHAPES[name]).to(device=device, dtype=dtype)
    proc = replace(make_processor(tok, model), eos_ids=[])    # no EOS: every row runs to full length
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 90, (batch, prompt_len), generator=g)
    prompts = [Prompt(ids=row.tolist()) for row in ids]
    cfg = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=new_tokens)
    ours = timed(lambda: generate(model, proc, prompts, 1, cfg), device, repeats)

    input_ids = ids.to(device)
    mask = torch.ones_like(input_ids)

    def hf():
        model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                       top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=proc.pad_id)
    theirs = timed(hf, device, repeats)
    tokens = batch * new_tokens
    # decoding reads every weight once per step, and the KV cache so far
    cfg_t = model.config.get_text_config()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = 2 * cfg_t.num_hidden_layers * cfg_t.num_key_value_heads * (
        cfg_t.hidden_size // cfg_t.num_attention_heads) * torch.finfo(dtype).bits // 8
    avg_len = prompt_len + new_tokens / 2
    step_bytes = weight_bytes + batch * avg_len * kv_per_token
    floor = tokens / (new_tokens * step_bytes / bandwidth)
    return {"shape": name, "device": device, "dtype": str(dtype).replace("torch.", ""), "batch": batch,
            "prompt_len": prompt_len, "new_tokens": new_tokens,
            "ours_tok_s": round(tokens / ours, 1), "hf_generate_tok_s": round(tokens / theirs, 1),
            "speedup_vs_hf_generate": round(theirs / ours, 2),
            "bandwidth_floor_tok_s": round(floor, 1), "fraction_of_floor": round(tokens / ours / floor, 4)}


def bench_copd_step(device, dtype):
    """Wall time of the pieces of one CoPD Phase II step for one branch (tiny policy)."""
    from opd import OPDConfig, opd_batch
    from rlvr import RLConfig, grpo_batch, loss_weights, backward_tokens
    from tasks import builtin_examples
    tok = build_tokenizer()
    student = build_tiny_policy(tok).to(device=device, dtype=dtype)
    teacher = copy.deepcopy(student)
    proc = make_processor(tok, student)
    rl = RLConfig(prompts_per_step=16, group_size=8, sampling=SamplingConfig(max_new_tokens=10))
    opd = OPDConfig(prompts_per_step=16, samples_per_prompt=4)
    own = builtin_examples("text", "train", 16, 0)
    other = builtin_examples("image", "train", 16, 0)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    times = {}

    def clock(key, fn):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times[key] = times.get(key, 0.0) + time.perf_counter() - t
        return out
    for _ in range(2):   # the second pass is the measurement
        times.clear()
        native, _ = clock("rollout + reward (GRPO batch)", lambda: grpo_batch(student, proc, own, rl))
        # opd_batch = student rollout + teacher scoring: time the scoring separately
        from rollout import generate as gen
        from policy import encode_prompt
        prompts = [encode_prompt(proc, e.prompt, e.image, e.video) for e in other]
        clock("rollout (OPD batch)", lambda: gen(student, proc, prompts, opd.samples_per_prompt, rl.sampling))
        distill, _ = clock("rollout + teacher scoring (OPD batch)",
                           lambda: opd_batch(student, {"image": teacher}, proc, other, rl, opd))
        weights = loss_weights([native.rollout.mask, distill.rollout.mask])
        opt.zero_grad()
        clock("forward + backward", lambda: [backward_tokens(student, proc, b.rollout, w, rl, b.token_loss)
                                             for b, w in zip([native, distill], weights)])
        clock("optimizer", opt.step)
    times["teacher scoring"] = times.pop("rollout + teacher scoring (OPD batch)") - times["rollout (OPD batch)"]
    total = sum(times.values())
    return [{"phase": k, "seconds": round(v, 4), "share": round(v / total, 3)} for k, v in times.items()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--quick", action="store_true", help="small sizes (a check that it runs)")
    args = ap.parse_args()
    torch.manual_seed(0)
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    bandwidth = measure_bandwidth(args.device)
    if cuda:
        cases = [("tiny", 64, 64, 256), ("qwen2-0.5b", 64, 64, 256)]
    elif args.quick:
        cases = [("tiny", 8, 16, 16)]
    else:
        cases = [("tiny", 64, 64, 128), ("qwen2-0.5b", 8, 32, 32)]
    rows = []
    for name, batch, prompt_len, new_tokens in cases:
        row = bench_sampler(name, args.device, dtype, batch, prompt_len, new_tokens, bandwidth, repeats=1 if args.quick else 2)
        rows.append(row)
        print(f"{name:>11} batch {batch} prompt {prompt_len} new {new_tokens}: ours {row['ours_tok_s']:>9.0f} tok/s, "
              f"HF generate {row['hf_generate_tok_s']:>9.0f} tok/s, x{row['speedup_vs_hf_generate']:.2f}, "
              f"floor {row['bandwidth_floor_tok_s']:.0f} tok/s ({100 * row['fraction_of_floor']:.1f}% of it)")
    breakdown = bench_copd_step(args.device, dtype)
    print("\none CoPD Phase II step, one branch (tiny policy, 16x8 GRPO + 16x4 OPD rollouts):")
    for r in breakdown:
        print(f"  {r['phase']:<32} {r['seconds']:.3f} s  {100 * r['share']:.0f}%")
    if args.json:
        machine = {"torch": torch.__version__, "bandwidth_GBps": round(bandwidth / 1e9, 1),
                   "gpu": torch.cuda.get_device_name() if cuda else None}
        rows = [{**row, **machine} for row in rows]
        rows += [{"kind": "copd_step", **r} for r in breakdown]
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
