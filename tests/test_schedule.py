"""The cheaper-update schedules (fairseq_asam.schedule), checked by numbers.

- each policy equals its rule written out by hand on least squares in float64 (closed-form gradients);
- k = 1 (and start = 0) equals full ASAM bit for bit, through the optimizer's step() and the vision step;
- a policy that never triggers equals the base optimizer bit for bit;
- the schedule's state round-trips through torch.save: resume == uninterrupted, bit for bit;
- bad values are clear errors naming the argument or flag.

    .venv/bin/pytest tests/test_schedule.py       # a few seconds
"""

import io
import math

import pytest
import torch
from torch import nn

from fairseq_asam import ASAM, SAM
from fairseq_asam.schedule import (
    AdaptiveTrigger,
    EveryK,
    Full,
    LatePhase,
    LookASAM,
    OnePass,
    make_schedule,
)
from fairseq_asam.vision.step import train_step

RHO, ETA, LR, MOM = 0.3, 0.01, 0.1, 0.9
STEPS = 9


# ---- the direct computation -------------------------------------------------------------------------


def _problem():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = torch.randn(16, generator=g, dtype=torch.float64)
    w0 = torch.randn(3, generator=g, dtype=torch.float64)
    return X, y, w0


def _grad(X, y, w):
    """grad of L(w) = ||X w - y||^2 / (2 n)."""
    return X.T @ (X @ w - y) / len(y)


def _eps(w, d):
    """ASAM's eps (paper Section 4, p = 2): rho T^2 d / ||T d||, T = |w| + eta."""
    T = w.abs() + ETA
    return RHO * T * T * d / torch.linalg.vector_norm(T * d)


def _direct(policy: str, **kw):
    """The weights after STEPS updates of plain gradient descent with the policy's rule, by hand."""
    X, y, w = _problem()
    w = w.clone()
    d = prev = buf = None
    mean = var = 0.0
    for t in range(STEPS):
        g = _grad(X, y, w)
        if policy == "one_pass":
            src = prev if kw["direction"] == "previous" else buf
            gt = g if src is None else _grad(X, y, w + _eps(w, src))
            prev = gt
            if kw["direction"] == "momentum":
                buf = gt.clone() if buf is None else MOM * buf + gt
                w = w - LR * buf
            else:
                w = w - LR * gt
            continue
        if policy == "every":
            full = t % kw["k"] == 0
        elif policy == "look":
            full = t % kw["k"] == 0
        elif policy == "late":
            full = t >= math.ceil(kw["start"] * STEPS)
        elif policy == "adaptive":
            sq = float(g @ g)
            mean = 0.9 * mean + 0.1 * sq
            var = 0.9 * var + 0.1 * (sq - mean) ** 2
            full = sq >= mean + kw["c"] * math.sqrt(var)
        else:
            full = True
        if full:
            gp = _grad(X, y, w + _eps(w, g))
            if policy == "look":
                v = gp - (gp @ g) / (g @ g) * g
                d = v / torch.linalg.vector_norm(v)
            w = w - LR * gp
        elif policy == "look" and d is not None:
            w = w - LR * (g + kw["alpha"] * torch.linalg.vector_norm(g) * d)
        else:
            w = w - LR * g
    return w


def _schedule(policy, **kw):
    return {"every": lambda: EveryK(kw["k"]), "look": lambda: LookASAM(kw["k"], kw["alpha"]),
            "late": lambda: LatePhase(kw["start"], STEPS), "adaptive": lambda: AdaptiveTrigger(kw["c"]),
            "one_pass": lambda: OnePass(kw["direction"]), "full": lambda: None}[policy]()


def _run_optimizer(policy, api, **kw):
    X, y, w0 = _problem()
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w0[None])
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM if kw.get("direction") == "momentum" else 0.0)
    opt = ASAM(model.named_parameters(), base, rho=RHO, eta=ETA, schedule=_schedule(policy, **kw))

    def loss():
        return 0.5 * (model(X).squeeze(1) - y).square().mean()

    def closure():
        opt.zero_grad()
        out = loss()
        out.backward()
        return out

    for _ in range(STEPS):
        if api == "closure":
            opt.step(closure)
        else:  # the loop of the schedule module's docstring
            opt.zero_grad()
            opt.begin_step()
            loss().backward()
            if opt.scheduled_ascent():
                loss().backward()
            opt.descent_step()
    return model.weight.detach()[0], opt


CASES = {
    "full": ("full", {}),
    "every3": ("every", {"k": 3}),
    "look3": ("look", {"k": 3, "alpha": 0.7}),
    "late0.5": ("late", {"start": 0.5}),
    "adaptive-c0": ("adaptive", {"c": 0.0}),
    "adaptive-c0.3": ("adaptive", {"c": 0.3}),
    "one_pass-previous": ("one_pass", {"direction": "previous"}),
    "one_pass-momentum": ("one_pass", {"direction": "momentum"}),
}


@pytest.mark.parametrize("api", ["closure", "loop"])
@pytest.mark.parametrize("case", list(CASES))
def test_policy_equals_its_rule_written_out(case, api):
    policy, kw = CASES[case]
    got, opt = _run_optimizer(policy, api, **kw)
    want = _direct(policy, **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    if policy not in ("full", "one_pass"):
        # The rule did run both kinds of update (else the comparison above proves little).
        assert 0 < opt.schedule.second_passes < STEPS, opt.schedule.second_passes
        assert opt.schedule.updates == STEPS


def test_counters_and_fraction():
    _, opt = _run_optimizer("every", "loop", k=3)
    assert (opt.schedule.updates, opt.schedule.second_passes) == (9, 3)
    assert opt.schedule.fraction == pytest.approx(1 / 3)
    _, opt = _run_optimizer("late", "closure", start=0.5)
    assert opt.schedule.second_passes == 4  # updates 5..8 of 0..8: ceil(0.5 * 9) = 5


# ---- k = 1 is the full update; never triggering is the base optimizer --------------------------------


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5))


def _batches(n=7):
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def _train(schedule, *, minimizer="asam", via="step", batches=None, net=None):
    model = (net or _net)()
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    if minimizer == "sgd":
        opt = base
    elif minimizer == "sam":
        opt = SAM(model.named_parameters(), base, rho=0.05, schedule=schedule)
    else:
        opt = ASAM(model.named_parameters(), base, rho=0.5, schedule=schedule)
    crit = nn.CrossEntropyLoss()
    for x, y in batches or _batches():
        if via == "vision":
            train_step(model, opt, crit, x, y)
        elif minimizer == "sgd":
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()
        else:
            def closure(x=x, y=y):
                opt.zero_grad()
                out = crit(model(x), y)
                out.backward()
                return out
            opt.step(closure)
    return [t.detach().clone() for t in model.state_dict().values()], opt


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("via", ["step", "vision"])
@pytest.mark.parametrize("minimizer", ["asam", "sam"])
@pytest.mark.parametrize("sched", ["every1", "look1", "late0"])
def test_k1_equals_full_bit_for_bit(sched, minimizer, via):
    s = {"every1": EveryK(1), "look1": LookASAM(1, 0.7), "late0": LatePhase(0.0, 7)}[sched]
    want, _ = _train(None, minimizer=minimizer, via=via)
    got, opt = _train(s, minimizer=minimizer, via=via)
    assert _same(got, want)
    assert opt.schedule.second_passes == 7


@pytest.mark.parametrize("via", ["step", "vision"])
@pytest.mark.parametrize("sched", ["late1", "adaptive-huge-c", "look-never-refreshed"])
def test_never_triggering_equals_the_base_optimizer(sched, via):
    s = {"late1": LatePhase(1.0, 7), "adaptive-huge-c": AdaptiveTrigger(1e6)}.get(sched)
    if sched == "look-never-refreshed":
        s = LookASAM(3, 0.7)
        s.updates = 1  # as if resumed off the refresh grid: no direction yet, no refresh in 1..2
        batches = _batches(2)
    else:
        batches = _batches()
    want, _ = _train(None, minimizer="sgd", via=via, batches=batches)
    got, opt = _train(s, via=via, batches=batches)
    assert _same(got, want)
    assert opt.schedule.second_passes == 0


def test_full_schedule_is_the_default():
    _, opt = _train(None)
    assert isinstance(opt.schedule, Full)
    assert "schedule" not in repr(opt)
    model = _net()
    opt = ASAM(model.named_parameters(), torch.optim.SGD(model.parameters(), lr=0.1), schedule=EveryK(5))
    assert repr(opt).endswith("schedule=EveryK(k=5))")


# ---- resume == uninterrupted ---------------------------------------------------------------------------


def _make(schedule_factory):
    model = _net()
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, ASAM(model.named_parameters(), base, rho=0.5, schedule=schedule_factory())


def _steps(model, opt, batches):
    crit = nn.CrossEntropyLoss()
    for x, y in batches:
        train_step(model, opt, crit, x, y)


@pytest.mark.parametrize("name", ["every3", "look3", "late", "adaptive", "one_pass-previous", "one_pass-momentum"])
def test_resume_equals_uninterrupted(name):
    factory = {"every3": lambda: EveryK(3), "look3": lambda: LookASAM(3, 0.7), "late": lambda: LatePhase(0.4, 8),
               "adaptive": lambda: AdaptiveTrigger(0.0), "one_pass-previous": lambda: OnePass("previous"),
               "one_pass-momentum": lambda: OnePass("momentum")}[name]
    batches = _batches(8)
    model, opt = _make(factory)
    _steps(model, opt, batches)
    want = [t.clone() for t in model.state_dict().values()]

    model, opt = _make(factory)
    _steps(model, opt, batches[:4])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    saved = opt.schedule.state_dict()
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # what the vision checkpoints load with
    model2, opt2 = _make(factory)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optimizer"])
    assert opt2.schedule.updates == 4 and opt2.schedule.second_passes == saved["second_passes"]
    _steps(model2, opt2, batches[4:])
    assert _same(list(model2.state_dict().values()), want)


def test_loading_another_policys_state_is_an_error():
    _, opt = _make(lambda: EveryK(3))
    _, other = _make(lambda: AdaptiveTrigger(1.0))
    with pytest.raises(ValueError, match="saved by the 'every' policy, not 'adaptive'"):
        other.load_state_dict(opt.state_dict())


# ---- bad values -------------------------------------------------------------------------------------------

BAD = [
    (lambda: EveryK(0), "k= must be >= 1, got 0"),
    (lambda: EveryK(2.5), "k= must be an integer, got 2.5"),
    (lambda: LookASAM(5, -0.1), "alpha= must be >= 0, got -0.1"),
    (lambda: LatePhase(1.5), r"start= must be in \[0, 1\], got 1.5"),
    (lambda: LatePhase(-0.1), r"start= must be in \[0, 1\], got -0.1"),
    (lambda: AdaptiveTrigger(float("inf")), "c= must be a finite number, got inf"),
    (lambda: AdaptiveTrigger(float("nan")), "c= must be a finite number, got nan"),
    (lambda: OnePass("sideways"), "direction= must be one of momentum, previous, got 'sideways'"),
    (lambda: make_schedule(every=0, flags={"every": "--asam-every"}), "--asam-every must be >= 1, got 0"),
    (lambda: make_schedule(every=5, reuse_alpha=-1, flags={"reuse_alpha": "--asam-reuse-alpha"}),
     "--asam-reuse-alpha must be >= 0, got -1"),
    (lambda: make_schedule(start=2, flags={"start": "--asam-start"}), r"--asam-start must be in \[0, 1\], got 2"),
    (lambda: make_schedule(adaptive_c=float("inf"), flags={"adaptive_c": "--asam-adaptive-c"}),
     "--asam-adaptive-c must be a finite number, got inf"),
    (lambda: make_schedule(reuse_alpha=0.5, flags={"reuse_alpha": "--asam-reuse-alpha", "every": "--asam-every"}),
     "--asam-reuse-alpha \\(Look-ASAM\\) needs --asam-every k >= 2, got 1"),
    (lambda: make_schedule(every=5, start=0.5, flags={"every": "--asam-every", "start": "--asam-start"}),
     "choose one cheaper-update policy, got --asam-every and --asam-start"),
]


@pytest.mark.parametrize("build,message", BAD)
def test_bad_values_are_clear_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_late_phase_needs_the_number_of_updates():
    model, opt = _make(lambda: LatePhase(0.5))
    with pytest.raises(RuntimeError, match="LatePhase needs the run's number of updates"):
        _steps(model, opt, _batches(1))


def test_schedule_must_be_a_schedule():
    model = _net()
    with pytest.raises(TypeError, match="schedule= must be a fairseq_asam.schedule.Schedule"):
        ASAM(model.named_parameters(), torch.optim.SGD(model.parameters(), lr=0.1), schedule="every5")


def test_make_schedule_builds_each_policy():
    assert isinstance(make_schedule(), Full)
    assert make_schedule(every=5).k == 5
    s = make_schedule(every=5, reuse_alpha=0.7)
    assert isinstance(s, LookASAM) and (s.k, s.alpha) == (5, 0.7)
    s = make_schedule(start=0.8, total_updates=100)
    assert isinstance(s, LatePhase) and s.switch == 80
    assert make_schedule(adaptive_c=1.0).c == 1.0
    assert make_schedule(one_pass="previous").direction == "previous"
    assert isinstance(make_schedule(one_pass="none"), Full)


def _indented_block_after(text: str, marker: str) -> str:
    lines = text.split(marker, 1)[1].split("\n")[2:]
    block = []
    for line in lines:
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    return "\n".join(block).strip() + "\n"


@pytest.mark.slow
def test_module_docstring_example_runs_as_written():
    import subprocess
    import sys

    import fairseq_asam.schedule as S

    code = _indented_block_after(S.__doc__, "(runs as is)::")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2 of 10 updates ran the second pass"


@pytest.mark.parametrize("name", ["every3", "look3", "late", "adaptive", "one_pass-previous", "one_pass-momentum"])
def test_vision_step_runs_the_same_rule_as_the_optimizer(name):
    # The vision entry point's update (its own helper, per-worker first pass) against ASAM.step(closure).
    # No BatchNorm: the vision step freezes running statistics in the second pass, step() does not.
    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 5))

    make = {"every3": lambda: EveryK(3), "look3": lambda: LookASAM(3, 0.7), "late": lambda: LatePhase(0.4, 7),
            "adaptive": lambda: AdaptiveTrigger(0.0), "one_pass-previous": lambda: OnePass("previous"),
            "one_pass-momentum": lambda: OnePass("momentum")}[name]
    a, oa = _train(make(), via="vision", net=mlp)
    b, ob = _train(make(), via="step", net=mlp)
    assert _same(a, b)
    assert oa.schedule.second_passes == ob.schedule.second_passes


@pytest.mark.slow
def test_docs_efficiency_python_example_runs():
    import pathlib
    import re
    import subprocess
    import sys

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "efficiency.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "4 of 20 updates ran the second pass (0.20)"
