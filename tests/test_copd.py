import copy

import pytest
import torch

import copd
from copd import PHASE_II, Branches, CoPDConfig, budget_schedule, describe, merge_average, neighbours, schedule
from opd import OPDConfig
from rlvr import RLConfig
from rollout import SamplingConfig
from tasks import builtin_examples


def test_neighbours_two_three_and_all_pairs():
    assert neighbours(["text", "image"]) == {"text": ["image"], "image": ["text"]}
    hub = neighbours(["text", "image", "video"])
    assert hub == {"text": ["image", "video"], "image": ["text"], "video": ["text"]}
    pairs = neighbours(["text", "image", "video"], "all-pairs")
    assert pairs["image"] == ["text", "video"]
    for links in (hub, pairs):
        assert all(d not in teachers for d, teachers in links.items())
    with pytest.raises(ValueError):
        neighbours(["text"])


def test_budget_matches_the_experts_and_the_paper_ratio():
    s_rl, s_opd = budget_schedule(total_steps=200, cycles=4)
    assert (s_rl, s_opd) == (30, 20) and 4 * (s_rl + s_opd) == 200
    # the paper's ablation ratios (S_RL : S_OPD of 1:1 and 1:2); each phase keeps at least one step
    assert budget_schedule(600, 4, ratio=1.0) == (75, 75) and budget_schedule(600, 4, ratio=0.5) == (50, 100)
    assert budget_schedule(4, 2, ratio=0.01) == (1, 1) and budget_schedule(4, 2, ratio=100) == (1, 1)
    steps = schedule(CoPDConfig(cycles=2, rl_steps=3, opd_steps=2))
    assert [p for _, p, _ in steps] == ["rl"] * 3 + ["opd"] * 2 + ["rl"] * 3 + ["opd"] * 2


def test_the_printed_plan_is_the_schedule(monkeypatch):
    cfg = CoPDConfig(cycles=3, rl_steps=4, opd_steps=2)
    assert describe(cfg, ["text", "image"]).splitlines()[0] == (
        "CoPD schedule: 2 branches, 3 cycles x (Phase I 4 RLVR steps + Phase II 2 RLVR+OPD steps) "
        "= 18 updates per branch")
    # a schedule changed in one place changes the printed plan with it
    monkeypatch.setattr(copd, "schedule", lambda c: [(0, "rl", 0), (0, "opd", 0), (1, "rl", 0), (1, "opd", 0)])
    assert "2 cycles x (Phase I 1 RLVR steps + Phase II 1 RLVR+OPD steps) = 4 updates" in describe(cfg, ["text", "image"])


def branches_of(models: dict, teachers_of: dict):
    """copd.Branches holding these very models, each with an SGD optimizer."""
    branches = Branches(next(iter(models.values())), list(models), teachers_of,
                        lambda m: torch.optim.SGD(m.parameters(), lr=1e-2))
    branches.models = models
    branches.optimizers = {d: torch.optim.SGD(m.parameters(), lr=1e-2) for d, m in models.items()}
    return branches


def step(branches, proc, pools, phase, rl, opd, step_seed):
    """One CoPD update of every branch, as train.train_copd takes it: sample, grade (Phase II), update."""
    own = branches.sample(proc, pools, phase, rl, opd, step_seed)
    grades = branches.grade(proc, own, rl, opd) if phase == PHASE_II else {d: {} for d in own}
    return branches.update(proc, own, grades, rl, opd)


def test_merge_of_identical_branches_is_the_identity(tiny):
    model, _ = tiny
    merged = merge_average([copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)])
    for a, b in zip(model.parameters(), merged.parameters()):
        assert torch.equal(a, b)


def test_merge_is_the_uniform_average(tiny):
    model, _ = tiny
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    merged = merge_average([model, other])
    for a, m in zip(model.parameters(), merged.parameters()):
        assert torch.allclose(m, a + 0.5)


def test_phase_two_routes_prompts_to_the_right_teacher_at_step_start(tiny, monkeypatch):
    model, proc = tiny
    domains = ["text", "image", "video"]
    branches = {d: copy.deepcopy(model) for d in domains}
    with torch.no_grad():   # tell the branches apart
        for i, m in enumerate(branches.values()):
            m.lm_head.weight.add_(0.01 * i)
    signature = lambda m: float(sum(p.detach().double().sum() for p in m.parameters()))
    at_start = {d: signature(m) for d, m in branches.items()}
    calls = []
    real = copd.teacher_logprobs

    def spy(teachers, proc_, rollout, row_domains, rl, keep):
        (teacher_domain, teacher), = teachers.items()
        calls.append((teacher_domain, teacher, set(row_domains)))
        assert signature(teacher) == at_start[teacher_domain]      # the teacher has not moved yet
        return real(teachers, proc_, rollout, row_domains, rl, keep)
    monkeypatch.setattr(copd, "teacher_logprobs", spy)
    real_rollout = copd.opd_rollout

    def spy_rollout(student, *a):
        rollout, row_domains = real_rollout(student, *a)
        students.append(student)
        return rollout, row_domains
    students = []
    monkeypatch.setattr(copd, "opd_rollout", spy_rollout)
    rl = RLConfig(prompts_per_step=2, group_size=2, sampling=SamplingConfig(max_new_tokens=4))
    opd = OPDConfig(prompts_per_step=2, samples_per_prompt=1)
    links = neighbours(domains)
    team = branches_of(branches, links)
    pools = {d: builtin_examples(d, "train", 8, 0) for d in domains}
    stats = step(team, proc, pools, "opd", rl, opd, step_seed=0)
    owner = {id(m): d for d, m in branches.items()}
    seen = set()
    assert len(students) == len(calls)
    for student, (teacher_domain, teacher, example_domains) in zip(students, calls):
        student_domain = owner[id(student)]
        assert teacher is branches[teacher_domain] and teacher is not student       # never itself
        assert example_domains == {teacher_domain}                                   # on the teacher's domain
        assert teacher_domain in links[student_domain]
        seen.add((student_domain, teacher_domain))
    assert seen == {(d, j) for d in domains for j in links[d]}                      # bidirectional
    assert all(signature(branches[d]) != at_start[d] for d in domains)              # then every branch moved
    assert "overlap_from_text" in stats["image"]
    # Phase I: no OPD at all
    calls.clear()
    step(team, proc, pools, "rl", rl, opd, step_seed=1)
    assert calls == []


def test_a_branch_steps_the_same_whatever_runs_beside_it(tiny):
    """Each branch draws from its own seeded stream, which is what lets parallel.py put branches
    on ranks of their own and still train each exactly as one process would: here the branches
    step in the opposite order and nothing changes."""
    model, proc = tiny
    rl = RLConfig(prompts_per_step=2, group_size=2, sampling=SamplingConfig(max_new_tokens=4))
    opd = OPDConfig(prompts_per_step=2, samples_per_prompt=2)
    pools = {d: builtin_examples(d, "train", 8, 0) for d in ("text", "image")}
    links = neighbours(["text", "image"])

    def one_step(order):
        branches = {d: copy.deepcopy(model) for d in order}
        with torch.no_grad():
            branches["image"].lm_head.weight.mul_(1.5)   # a teacher that disagrees
        step(branches_of(branches, links), proc, pools, "opd", rl, opd, step_seed=7)
        return branches

    forward, backward = one_step(["text", "image"]), one_step(["image", "text"])
    assert not torch.equal(forward["text"].lm_head.weight, model.lm_head.weight)
    for d in ("text", "image"):
        for a, b in zip(forward[d].parameters(), backward[d].parameters()):
            assert torch.equal(a, b)


def test_divergence_pairs_are_neighbours_and_each_branch_against_base(tiny):
    model, _ = tiny
    models = {d: copy.deepcopy(model) for d in ("text", "image", "video")}
    probes = branches_of(models, neighbours(list(models))).divergence_pairs(model)
    assert [(pair, domain) for pair, _, _, domain in probes] == [
        ("text~video", "text"), ("text~base", "text"), ("image~text", "image"), ("image~base", "image"),
        ("video~base", "video")]
    assert all(teacher is model for pair, _, teacher, _ in probes if pair.endswith("~base"))
