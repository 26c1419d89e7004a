"""
Benchmarks: our sampler against HF `generate` on the same weights, prompts, lengths and
sampling settings, beside the weight+KV bandwidth floor; and where the time of one CoPD
Phase II step goes (rollout, teacher scoring, backward, optimizer).

    python bench.py --device cpu --json out.json   # or --device cuda
    python bench.py --profile                      # torch.profiler's top ops of one CoPD step
    OMP_NUM_THREADS=1 python bench.py --warm-start # π_0's step: padded, per domain, compiled
    OMP_NUM_THREADS=1 python bench.py --micro-batch 64,128   # the CoPD step at two micro-batch sizes

`--json PATH` writes a list of rows: one per sampler measurement (`speedup_vs_hf_generate`),
then one per piece of the CoPD step (`"kind": "copd_step"`). Speed is measured here, never in tests.
"""

import argparse
import copy
import json
import re
import time
from dataclasses import replace

import torch

from policy import Prompt, TinyConfig, build_tiny_policy, build_tokenizer, make_processor
from memory import kv_bytes_per_token
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
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = kv_bytes_per_token(model)
    avg_len = prompt_len + new_tokens / 2
    step_bytes = weight_bytes + batch * avg_len * kv_per_token
    floor = tokens / (new_tokens * step_bytes / bandwidth)
    return {"shape": name, "device": device, "dtype": str(dtype).replace("torch.", ""), "batch": batch,
            "prompt_len": prompt_len, "new_tokens": new_tokens,
            "ours_tok_s": round(tokens / ours, 1), "hf_generate_tok_s": round(tokens / theirs, 1),
            "speedup_vs_hf_generate": round(theirs / ours, 2),
            "bandwidth_floor_tok_s": round(floor, 1), "fraction_of_floor": round(tokens / ours / floor, 4)}


def bench_copd_step(device, dtype, tiny: TinyConfig = TinyConfig(), rl=None, opd=None, repeats: int = 5):
    """Wall time of the pieces of one CoPD Phase II step for one branch: by default the tiny
    policy with the cpu preset's batches (16x8 GRPO + 8x8 OPD rollouts, its micro-batch). Each
    piece's fastest of `repeats` passes; `step_to_rollout` is the whole step over its two rollouts."""
    from config import presets
    from opd import distribution_rows, opd_batch, opd_rollout, teacher_logprobs
    from rlvr import grpo_batch, loss_weights, backward_tokens
    from tasks import builtin_examples
    rl = rl or presets()["cpu"].rl
    opd = opd or presets()["cpu"].opd
    tok = build_tokenizer()
    student = build_tiny_policy(tok, tiny).to(device=device, dtype=dtype)
    teacher = copy.deepcopy(student)
    proc = make_processor(tok, student)
    own = builtin_examples("text", "train", rl.prompts_per_step, 0)
    other = builtin_examples("image", "train", opd.prompts_per_step, 0)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    times = {}

    def clock(key, fn):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times[key] = times.get(key, 0.0) + time.perf_counter() - t
        return out
    best = {}
    for rep in range(repeats + 1):   # the first pass warms up; each piece's fastest pass is kept
        times.clear()
        native, _ = clock("rollout + reward (GRPO batch)", lambda: grpo_batch(student, proc, own, rl))
        rollout, domains = clock("rollout (OPD batch)", lambda: opd_rollout(student, proc, other, rl, opd))
        lp, full = clock("teacher scoring", lambda: teacher_logprobs({"image": teacher}, proc, rollout, domains, rl,
                                                                      distribution_rows(opd, rollout)))
        distill = opd_batch(rollout, lp, full, opd)
        weights = loss_weights([native.rollout.mask, distill.rollout.mask])
        opt.zero_grad()
        clock("forward + backward", lambda: [backward_tokens(student, proc, b, w, rl)
                                             for b, w in zip([native, distill], weights)])
        clock("optimizer", opt.step)
        if rep > 0 or not repeats:
            best = {k: min(v, best.get(k, v)) for k, v in times.items()}
    total = sum(best.values())
    rollouts = best["rollout + reward (GRPO batch)"] + best["rollout (OPD batch)"]
    return {"phases": [{"phase": k, "seconds": round(v, 4), "share": round(v / total, 3)} for k, v in best.items()],
            "step_s": round(total, 4), "step_to_rollout": round(total / rollouts, 2)}


def bench_micro_batch(sizes: list, rounds: int = 3, repeats: int = 6) -> list:
    """The CoPD step (`bench_copd_step`, cpu preset) at each micro-batch size, the sizes taking
    turns for `rounds` rounds so that a slower stretch of the machine hits them all; per size the
    median over rounds of each round's fastest pass. With OMP_NUM_THREADS=1: one lane."""
    from config import presets
    rl = presets()["cpu"].rl
    passes = {n: [] for n in sizes}
    for _ in range(rounds):
        for n in sizes:
            passes[n].append(bench_copd_step("cpu", torch.float32, rl=replace(rl, micro_batch=n), repeats=repeats))
    rows = []
    for n, runs in passes.items():
        median = lambda key: sorted(key(r) for r in runs)[len(runs) // 2]
        fwd_bwd = median(lambda r: next(p["seconds"] for p in r["phases"] if p["phase"] == "forward + backward"))
        rows.append({"kind": "micro_batch", "micro_batch": n, "step_s": median(lambda r: r["step_s"]),
                     "forward_backward_s": fwd_bwd, "threads": torch.get_num_threads()})
    return rows


def bench_warm_start(steps: int = 40, examples: int = 300, warmup: int = 5) -> list:
    """Seconds per step of the cpu preset's warm start (π_0's supervised pass, 72 rows) three
    ways on the same model, rows and order: one padded forward of all rows (the old recipe), one
    forward per domain (the recipe), and one per domain with the decoder layers compiled (tried,
    not kept: README, Performance). The median of `steps` steps after `warmup` (compiling
    happens in those; their sum is reported as the warm-up). With OMP_NUM_THREADS=1: one lane."""
    import random
    from config import presets
    from tasks import builtin_examples
    from warmstart import domain_rows, encode_example, sft_loss
    cfg, tiny = presets()["cpu"].warm, presets()["cpu"].tiny
    share = domain_rows(cfg)
    rows = []
    for way, per_domain, compiled in (("one padded forward", False, False),
                                      ("one forward per domain", True, False),
                                      ("per domain, layers compiled", True, True)):
        tok = build_tokenizer()
        model = build_tiny_policy(tok, tiny, 0)
        proc = make_processor(tok, model)
        data = {d: [encode_example(model, proc, ex) for ex in builtin_examples(d, "train", examples, 0, levels=cfg.levels[d])]
                for d in share}
        if compiled:
            for layer in model.get_decoder().layers:
                layer.compile(dynamic=True)    # one graph for every batch and length
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        rng = random.Random(0)
        times = []
        for _ in range(warmup + steps):
            batches = [rng.sample(data[d], n) for d, n in share.items()]
            t = time.perf_counter()
            loss = sft_loss(model, proc, batches if per_domain else [sum(batches, [])])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
        median = sorted(times[warmup:])[steps // 2]
        rows.append({"kind": "warm_start_step", "way": way, "seconds": round(median, 4),
                     "warmup_s": round(sum(times[:warmup]), 1), "threads": torch.get_num_threads()})
    for r in rows:
        r["vs_padded"] = round(r["seconds"] / rows[0]["seconds"], 3)
    return rows


# -----------------------------------------------------------------------------
# the GPU check: every GPU claim of this repository measured in one call
#
#     python bench.py --check --out gpu_check                            # one GPU, under 8 minutes
#     python bench.py --check --device cpu --quick --out runs/check      # the same steps on CPU, ~1 min

def _sh(cmd: list, timeout: float, env: dict | None = None):
    """(return code or "timeout", seconds, last lines of the output) of a command."""
    import os
    import subprocess
    import sys
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
        code, out = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        code, out = "timeout", (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    return code, round(time.perf_counter() - t, 1), "\n".join(out.strip().splitlines()[-15:])


def pytest_summary(output: str) -> str:
    """pytest's last line ("3 passed in 2.1s"), not a plugin's warning printed after it."""
    lines = output.splitlines()
    counts = [line for line in lines if re.search(r"\b(passed|failed|errors?|no tests ran)\b", line)]
    return counts[-1] if counts else (lines[-1] if lines else "")


def check_copd_run(out: str, preset: str, budget_s: float) -> dict:
    """`train.py --method copd` at `preset`: its wall time, or, cut at `budget_s`, the updates it
    reached and the time all K·T updates would take at that pace (extrapolated, final evaluation
    not included)."""
    import json
    import os
    from config import presets
    cmd = ["train.py", "--experts", "text,image", "--method", "copd", "--preset", preset, "--out", out, "--overwrite"]
    code, seconds, tail = _sh(cmd, budget_s)
    row = {"command": "python " + " ".join(cmd), "exit": code, "seconds": seconds}
    if code == 0:
        return {**row, "wall_s": seconds, "how": "measured, start to finish (π_0 included unless cached)"}
    metrics = os.path.join(out, "metrics.jsonl")
    rows = [json.loads(line) for line in open(metrics)] if os.path.exists(metrics) else []
    trained = [r for r in rows if r.get("kind") == "train" and r["model"].startswith("copd:")]
    total = 2 * presets()[preset].steps
    if code != "timeout" or not trained:
        return {**row, "error": tail}
    done, at = trained[-1]["step"], trained[-1]["time"]
    startup = seconds - at          # π_0 and the first eval, before the loop's clock started
    return {**row, "updates_done": done, "updates_total": total, "loop_s": at,
            "wall_s": round(startup + at / done * total, 1),
            "how": f"extrapolated from the first {done} of {total} updates (final evaluation not included)"}


def gpu_check(device: str, quick: bool, out: str) -> dict:
    """The GPU tests, the sampler against HF `generate` and the floor, one CoPD step's
    breakdown at the gpu preset, the gpu preset's CoPD wall time, and a 2-rank NCCL run when two
    GPUs exist. Writes OUT/check.json and OUT/check.md; returns the JSON."""
    import json
    import os
    from config import presets
    os.makedirs(out, exist_ok=True)
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "quick": quick, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.perf_counter()

    code, seconds, tail = _sh(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_rollout.py"], 300)
    result["tests"] = {"command": "python -m pytest -q tests/test_rollout.py", "exit": code, "seconds": seconds,
                       "summary": pytest_summary(tail)}

    bandwidth = measure_bandwidth(device)
    cases = ([("tiny", 8, 16, 16)] if quick else
             [(shape, batch, 64, 256) for shape in ("tiny", "qwen2-0.5b") for batch in (64, 256)])
    result["sampler"] = [bench_sampler(name, device, dtype, b, p, n, bandwidth, repeats=1 if quick else 2)
                         for name, b, p, n in cases]

    preset = presets()["smoke" if quick else "gpu"]
    result["copd_step"] = {"preset": "smoke" if quick else "gpu",
                           **bench_copd_step(device, dtype, preset.tiny, preset.rl, preset.opd, 1 if quick else 3)}

    result["copd_run"] = check_copd_run(os.path.join(out, "copd-run"), "smoke" if quick else "gpu",
                                        budget_s=120 if quick else 210)

    if cuda and torch.cuda.device_count() >= 2:
        cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               "--experts", "text,image", "--method", "copd", "--preset", "smoke", "--out",
               os.path.join(out, "nccl"), "--overwrite"]
        code, seconds, tail = _sh(cmd, 240)
        result["nccl"] = {"exit": code, "seconds": seconds, **({} if code == 0 else {"error": tail})}
    else:
        result["nccl"] = {"skipped": "needs two GPUs" if cuda else "no GPU"}
    result["total_s"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(out, "check.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "check.md"), "w") as f:
        f.write(check_table(result) + "\n")
    return result


def check_table(r: dict) -> str:
    """The check as markdown: what ran, what it measured."""
    lines = [f"# GPU check: {r['device']}, torch {r['torch']}" + (" (--quick)" if r["quick"] else ""), "",
             f"Started {r['started']}, {r['total_s']} s in all.", "",
             f"Tests (`{r['tests']['command']}`): exit {r['tests']['exit']}, {r['tests']['summary']}", "",
             "| shape | batch | prompt | new | ours tok/s | HF generate tok/s | speed-up | floor tok/s | of floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {s['shape']} | {s['batch']} | {s['prompt_len']} | {s['new_tokens']} | {s['ours_tok_s']:.0f} | "
              f"{s['hf_generate_tok_s']:.0f} | x{s['speedup_vs_hf_generate']:.2f} | {s['bandwidth_floor_tok_s']:.0f} | "
              f"{100 * s['fraction_of_floor']:.1f}% |" for s in r["sampler"]]
    step = r["copd_step"]
    lines += ["", f"One CoPD Phase II step of one branch ({step['preset']} preset):", "",
              "| piece | seconds | share |", "|---|---|---|"]
    lines += [f"| {p['phase']} | {p['seconds']:.3f} | {100 * p['share']:.0f}% |" for p in step["phases"]]
    lines += [f"| the step ({step['step_to_rollout']:.2f}x its rollouts) | {step['step_s']:.3f} | 100% |"]
    run = r["copd_run"]
    wall = f"{run['wall_s'] / 60:.1f} min, {run['how']}" if "wall_s" in run else f"failed: {run.get('error', '')[-300:]}"
    lines += ["", f"`{run['command']}`: {wall}.", "",
              "NCCL, 2 ranks: " + (r["nccl"]["skipped"] if "skipped" in r["nccl"] else f"exit {r['nccl']['exit']}, "
                                   f"{r['nccl']['seconds']} s")]
    return "\n".join(lines)


def report(title: str, lines: list, rows: list, json_path: str | None):
    """A measurement's lines under its title, and its rows as JSON where asked."""
    print(title)
    for line in lines:
        print("  " + line)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--quick", action="store_true", help="small sizes (a check that it runs)")
    ap.add_argument("--check", action="store_true", help="the one-call GPU check: tests, sampler, CoPD step, "
                                                          "gpu preset wall time, NCCL (writes OUT/check.json, check.md)")
    ap.add_argument("--out", default="gpu_check", help="--check writes here")
    ap.add_argument("--profile", action="store_true", help="torch.profiler's top ops of one CoPD step")
    ap.add_argument("--warm-start", action="store_true", help="seconds per step of π_0's warm start, three ways")
    ap.add_argument("--micro-batch", default=None, metavar="N,M", help="the CoPD step at these micro-batch sizes, taking turns")
    args = ap.parse_args()
    from config import UsageError
    from settings import check_device
    try:
        check_device(args.device)
    except UsageError as e:
        ap.exit(2, f"error: {e}\n")
    sizes = [int(n) if n.strip().isdigit() else 0 for n in (args.micro_batch or "").split(",")]
    if args.micro_batch and min(sizes) < 1:
        ap.exit(2, f"error: --micro-batch takes comma-separated sizes of at least 1, got '{args.micro_batch}'\n")
    if args.check:
        print(check_table(gpu_check(args.device, args.quick, args.out)))
        return
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        bench_copd_step(args.device, torch.float32, repeats=0)            # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            bench_copd_step(args.device, torch.float32, repeats=0)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        return
    if args.micro_batch:
        rows = bench_micro_batch(sizes, rounds=1 if args.quick else 3)
        lines = [f"micro-batch {r['micro_batch']:>4}: step {r['step_s']:.3f} s, forward + backward {r['forward_backward_s']:.3f} s"
                 for r in rows]
        report(f"one CoPD Phase II step (cpu preset, {rows[0]['threads']} thread(s), median of the rounds):", lines, rows, args.json)
        return
    if args.warm_start:
        rows = bench_warm_start(steps=8 if args.quick else 40)
        lines = [f"{r['way']:<30} {r['seconds']:.3f} s  x{r['vs_padded']:.2f}  (warm-up {r['warmup_s']:.0f} s)" for r in rows]
        report(f"warm-start step (cpu preset, 72 rows, {rows[0]['threads']} thread(s), median of the steps after warm-up):",
               lines, rows, args.json)
        return
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
    print("\none CoPD Phase II step, one branch (tiny policy, 16x8 GRPO + 8x8 OPD rollouts):")
    for r in breakdown["phases"]:
        print(f"  {r['phase']:<32} {r['seconds']:.3f} s  {100 * r['share']:.0f}%")
    print(f"  {'the step':<32} {breakdown['step_s']:.3f} s  = {breakdown['step_to_rollout']:.2f} x its rollouts")
    if args.json:
        machine = {"torch": torch.__version__, "bandwidth_GBps": round(bandwidth / 1e9, 1),
                   "gpu": torch.cuda.get_device_name() if cuda else None}
        rows = [{**row, **machine} for row in rows]
        rows += [{"kind": "copd_step", **r} for r in breakdown["phases"]]
        rows += [{"kind": "copd_step", "phase": "the step", "seconds": breakdown["step_s"],
                  "step_to_rollout": breakdown["step_to_rollout"]}]
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
