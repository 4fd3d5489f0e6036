"""The Perturbation object and the ASAM/SAM shells over it: torch.optim conventions, in-place restore,
the davda54/sam constructor, one argument checker, the private reaches."""

import copy
import io
import math
import warnings

import pytest
import torch
from test_core import closed_form_eps, loss_of, make
from torch import nn

from fairseq_asam import ASAM, SAM, Perturbation, _compat, checks
from fairseq_asam.core import perturbation

INF = float("inf")


def _eps_of(model, do_ascent):
    w0 = [p.detach().clone() for p in model.parameters()]
    do_ascent()
    return [p.detach() - w for p, w in zip(model.parameters(), w0)]


def test_standalone_perturbation_equals_the_shell_bitwise():
    m1, x, y = make()
    m2 = copy.deepcopy(m1)
    opt = ASAM(m1.named_parameters(), torch.optim.SGD(m1.parameters(), lr=0.05, momentum=0.9), rho=0.4)
    pert = Perturbation(m2.named_parameters(), rho=0.4)
    base = torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        loss_of(m1, x, y).backward()
        opt.ascent_step()
        loss_of(m1, x, y).backward()
        opt.descent_step()
        loss_of(m2, x, y).backward()
        assert pert.ascend() and pert.perturbed
        loss_of(m2, x, y).backward()
        pert.restore()
        assert not pert.perturbed
        base.step()
        base.zero_grad()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_operator_and_compute_eps_match_the_closed_form():
    model, x, y = make()
    pert = Perturbation(model.named_parameters(), rho=0.3, normalization="filter")
    loss_of(model, x, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    expected = closed_form_eps(model, grads, rho=0.3, eta=0.01, p=2, normalization="filter",
                               normalize_bias=False, adaptive=True)
    for e, got in zip(expected, pert.compute_eps(grads)):
        torch.testing.assert_close(got, e, rtol=1e-9, atol=1e-12)
    for (name, w), t in zip(model.named_parameters(), pert.operator()):
        if name.endswith("bias"):
            want = torch.ones_like(w)
        elif w.dim() >= 3:
            want = torch.stack([f.norm() + 0.01 for f in w.detach()]).reshape(-1, 1, 1, 1).expand_as(w)
        else:
            want = w.detach().abs() + 0.01
        torch.testing.assert_close(t, want, rtol=1e-12, atol=0)
    # compute_eps leaves weights and grads alone
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_a_view_taken_before_the_ascent_sees_w_plus_eps_then_w():
    model, x, y = make()
    opt = ASAM(model.named_parameters(), torch.optim.SGD(model.parameters(), lr=0.0), rho=0.5)
    view = model.fc.weight.view(-1)  # e.g. a flat-parameter wrapper's view, or a graph's captured input
    alias = model.fc.weight.data
    w = view.clone()
    loss_of(model, x, y).backward()
    opt.ascent_step()
    assert torch.equal(view, model.fc.weight.detach().view(-1)) and not torch.equal(view, w)
    assert torch.equal(alias, model.fc.weight.detach())
    loss_of(model, x, y).backward()
    opt.descent_step()
    assert torch.equal(view, w) and torch.equal(alias.view(-1), w)


def test_tied_weights_are_perturbed_once_and_seen_by_both_uses():
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 5, dtype=torch.float64)
            self.out = nn.Linear(5, 7, bias=False, dtype=torch.float64)
            self.out.weight = self.emb.weight  # one tensor, two uses

        def forward(self, idx):
            return self.out(self.emb(idx))

    model = Tied()
    idx, tgt = torch.randint(0, 7, (9,)), torch.randint(0, 7, (9,))
    params = list(model.named_parameters())
    assert len(params) == 1
    opt = ASAM(params, torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5)
    w = model.emb.weight.detach().clone()
    nn.functional.cross_entropy(model(idx), tgt).backward()
    g = model.emb.weight.grad.clone()
    opt.ascent_step()
    t = w.abs() + 0.01
    eps = 0.5 * t * t * g / (t * g).norm()
    torch.testing.assert_close(model.emb.weight.detach(), w + eps, rtol=1e-12, atol=1e-14)
    assert model.out.weight is model.emb.weight
    # the second-pass gradient is the one at w + eps of the tied model, computed directly
    ref = copy.deepcopy(model)
    nn.functional.cross_entropy(model(idx), tgt).backward()
    nn.functional.cross_entropy(ref(idx), tgt).backward()
    opt.descent_step()
    torch.testing.assert_close(model.emb.weight.detach(), w - 0.1 * ref.emb.weight.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
def test_torch_compile_gives_the_same_updates_as_eager():
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    twin = copy.deepcopy(eager)
    start = [p.detach().clone() for p in eager.parameters()]
    compiled = torch.compile(twin)  # default mode (inductor) on the CPU
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    runs = []
    for model, params in ((eager, eager), (compiled, twin)):
        opt = ASAM(params.named_parameters(), torch.optim.SGD(params.parameters(), lr=0.1), rho=0.5)
        for _ in range(3):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.ascent_step()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.descent_step()
        runs.append([p.detach().clone() for p in params.parameters()])
    for a, b, w in zip(*runs, start):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, w)  # the updates moved the weights


def test_rho_lives_in_param_groups_a_schedule_changes_it_and_state_dict_carries_it():
    model, x, y = make()
    opt = ASAM(model.named_parameters(), torch.optim.SGD(model.parameters(), lr=0.0), rho=0.5)
    assert opt.param_groups[0]["rho"] == 0.5 and opt.param_groups is opt.base_optimizer.param_groups
    for rho in (0.5, 0.25, 0.125):  # a rho schedule: set it between updates, as a scheduler sets lr
        for g in opt.param_groups:
            g["rho"] = rho
        loss_of(model, x, y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        expected = closed_form_eps(model, grads, rho=rho, eta=0.01, p=2, normalization="element",
                                   normalize_bias=False, adaptive=True)
        for e, got in zip(expected, _eps_of(model, opt.ascent_step)):
            torch.testing.assert_close(got, e, rtol=1e-9, atol=1e-12)
        loss_of(model, x, y).backward()
        opt.descent_step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    m2 = copy.deepcopy(model)
    o2 = ASAM(m2.named_parameters(), torch.optim.SGD(m2.parameters(), lr=0.0), rho=0.9)
    o2.load_state_dict(torch.load(buf))
    assert o2.param_groups[0]["rho"] == 0.125 and o2.rho == 0.125
    assert o2.perturbation.param_groups is o2.base_optimizer.param_groups


def test_per_group_rho_scales_each_group_with_the_global_norm():
    model, x, y = make()
    conv = [(n, p) for n, p in model.named_parameters() if n.startswith("conv")]
    rest = [(n, p) for n, p in model.named_parameters() if not n.startswith("conv")]
    opt = ASAM([{"params": conv, "rho": 0.1}, {"params": rest}], torch.optim.SGD, rho=0.4, lr=0.0)
    assert [g["rho"] for g in opt.param_groups] == [0.1, 0.4]
    loss_of(model, x, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    unit = closed_form_eps(model, grads, rho=1.0, eta=0.01, p=2, normalization="element", normalize_bias=False,
                           adaptive=True)
    got = _eps_of(model, opt.ascent_step)
    for (name, _), e, g in zip(model.named_parameters(), unit, got):
        torch.testing.assert_close(g, e * (0.1 if name.startswith("conv") else 0.4), rtol=1e-9, atol=1e-12)


def test_add_param_group_perturbs_the_new_parameters():
    model, x, y = make()
    first = [(n, p) for n, p in model.named_parameters() if not n.startswith("fc")]
    opt = ASAM(first, torch.optim.SGD([p for _, p in first], lr=0.1), rho=0.3)
    opt.add_param_group({"params": [(n, p) for n, p in model.named_parameters() if n.startswith("fc")], "lr": 0.2})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["rho"] == 0.3 and opt.param_groups[1]["lr"] == 0.2
    loss_of(model, x, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    expected = closed_form_eps(model, grads, rho=0.3, eta=0.01, p=2, normalization="element",
                               normalize_bias=False, adaptive=True)
    got = _eps_of(model, opt.ascent_step)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    assert float(model.fc.bias.detach().sub(model.fc.bias.detach()).abs().sum()) == 0


def _davda54_reference(model, x, y, steps, rho, adaptive, lr, momentum):
    """The davda54/sam algorithm written from its description: e_w = (w^2 if adaptive else 1) * g * scale,
    scale = rho / (||(|w| if adaptive else 1) * g||_2 + 1e-12) over every parameter; w -= e_w; SGD step."""
    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for _ in range(steps):
        loss_of(model, x, y).backward()
        with torch.no_grad():
            params = list(model.parameters())
            norm = torch.stack([((p.abs() if adaptive else 1.0) * p.grad).norm() for p in params]).norm()
            scale = rho / (norm + 1e-12)
            e = [(p.pow(2) if adaptive else 1.0) * p.grad * scale for p in params]
            for p, ei in zip(params, e):
                p.add_(ei)
        base.zero_grad()
        loss_of(model, x, y).backward()
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.sub_(ei)
        base.step()
        base.zero_grad()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("adaptive", [False, True])
def test_davda54_constructor_and_loop_run_unchanged(adaptive):
    """SAM(model.parameters(), torch.optim.SGD, rho=..., adaptive=..., lr=..., momentum=...) and a loop with
    first_step(zero_grad=True) / second_step(zero_grad=True): the wrapper's own numbers."""
    m1, x, y = make()
    m2 = copy.deepcopy(m1)
    rho = 2.0 if adaptive else 0.05
    opt = SAM(m1.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=0.05, momentum=0.9)
    for _ in range(3):
        loss_of(m1, x, y).backward()
        opt.first_step(zero_grad=True)
        loss_of(m1, x, y).backward()
        opt.second_step(zero_grad=True)
    ref = _davda54_reference(m2, x, y, 3, rho, adaptive, 0.05, 0.9)
    for a, b in zip(m1.parameters(), ref):
        torch.testing.assert_close(a.detach(), b, rtol=1e-9, atol=1e-11)
    assert isinstance(opt.base_optimizer, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9


def test_paper_asam_with_a_base_optimizer_class():
    m1, x, y = make()
    m2 = copy.deepcopy(m1)
    o1 = ASAM(m1.named_parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    o2 = ASAM(m2.named_parameters(), torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9), rho=0.5)
    for m, o in ((m1, o1), (m2, o2)):
        for _ in range(2):
            loss_of(m, x, y).backward()
            o.ascent_step()
            loss_of(m, x, y).backward()
            o.descent_step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_applied_norm_shows_what_half_precision_rounds_away():
    torch.manual_seed(0)
    w32 = torch.randn(256, 256)
    for dtype, lo, hi in ((torch.float32, 0.999, 1.001), (torch.float16, 0.0, 0.9)):
        w = nn.Parameter(w32.to(dtype))
        w.grad = torch.randn(256, 256).to(dtype)
        pert = Perturbation([("w", w)], rho=0.001)
        assert pert.applied_eps_norm() is None
        pert.ascend()
        ratio = float(pert.applied_eps_norm()) / float(pert.last_eps_norm)
        assert lo <= ratio <= hi, (dtype, ratio)
        pert.restore()
        assert torch.equal(w, w32.to(dtype))


BAD_RUNTIME = [
    (lambda g: g.__setitem__("rho", -1.0), "param_groups[0]['rho'] must be > 0, got -1"),
    (lambda g: g.__setitem__("eta", float("nan")), "param_groups[0]['eta'] must be a finite number >= 0, got nan"),
    (lambda g: g.__setitem__("p", 3), "param_groups[0]['p'] must be 2 or inf, got 3"),
]


@pytest.mark.parametrize("change,message", BAD_RUNTIME, ids=[m for _, m in BAD_RUNTIME])
def test_bad_values_set_in_param_groups_are_caught_at_the_ascent(change, message):
    model, x, y = make()
    opt = ASAM(model.named_parameters(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5)
    change(opt.param_groups[0])
    w = [p.detach().clone() for p in model.parameters()]
    loss_of(model, x, y).backward()
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        opt.ascent_step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))


def test_shell_argument_errors():
    model, _, _ = make()
    with pytest.raises(ValueError, match="same p"):
        opt = ASAM([{"params": [model.conv.weight], "p": INF}, {"params": list(model.named_parameters())[1:]}],
                   torch.optim.SGD, lr=0.1)
        model.conv.weight.grad = torch.ones_like(model.conv.weight)
        model.fc.weight.grad = torch.ones_like(model.fc.weight)
        opt.ascent_step()
    with pytest.raises(TypeError, match="for a base optimizer class"):
        ASAM(model.named_parameters(), torch.optim.SGD(model.parameters(), lr=0.1), lr=0.1)
    with pytest.raises(ValueError, match="set per-group options on the base optimizer"):
        ASAM([{"params": list(model.named_parameters()), "rho": 0.1}], torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="apply to SAM\\(adaptive=True\\) or ASAM only"):
        SAM(model.named_parameters(), torch.optim.SGD(model.parameters(), lr=0.1), eta=0.1)
    with pytest.raises(ValueError, match="adaptive= must be True or False"):
        SAM(model.parameters(), torch.optim.SGD, adaptive="yes", lr=0.1)


def test_legacy_state_dict_with_rho_outside_the_groups_loads():
    model, x, y = make()
    opt = ASAM(model.named_parameters(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5)
    base = torch.optim.SGD(copy.deepcopy(model).parameters(), lr=0.3).state_dict()
    legacy = {"base": base, "asam": dict(rho=0.7, eta=0.02, p=2.0, normalization="element", normalize_bias=False,
                                         adaptive=True)}
    opt.load_state_dict(legacy)
    assert (opt.rho, opt.eta, opt.param_groups[0]["lr"]) == (0.7, 0.02, 0.3)


def test_perturbation_function_rejects_bad_values_with_the_same_checker():
    with pytest.raises(ValueError, match="rho= must be > 0, got 0"):
        perturbation([torch.ones(2)], [torch.ones(2)], rho=0)


@pytest.mark.parametrize("front,text,message", [
    (checks.argparse_type(checks.check_rho, "--rho"), "-1", "--rho must be > 0, got -1"),
    (checks.argparse_type(checks.check_rho, "--asam-rho"), "big", "--asam-rho must be a number, got 'big'"),
    (checks.argparse_type(checks.check_eta, "--eta"), "nan", "--eta must be a finite number >= 0, got nan"),
    (checks.argparse_type(checks.check_p, "--asam-p", convert=str), "1", "--asam-p must be 2 or inf, got 1"),
    (checks.argparse_type(lambda v, f: checks.check_int(v, f, 1), "--steps", convert=int), "0",
     "--steps must be >= 1, got 0"),
])
def test_argparse_types_name_the_flag(front, text, message):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match=message):
        front(text)


def test_private_reaches_exist_and_a_missing_one_says_what_and_why():
    assert set(_compat.check_all().values()) == {"ok"}
    missing = _compat.Reach("torch", "torch.optim:Optimizer", "_no_such_attribute", "a test of the message")
    with pytest.raises(RuntimeError, match=r"_no_such_attribute does not exist in torch .*needs it for a test"):
        missing.resolve()
    gone = _compat.Reach("torch", "torch.optim.lr_scheduler", "_no_such_attribute", "a test", in_source=True)
    with pytest.raises(RuntimeError, match="no longer sets _no_such_attribute"):
        gone.resolve()
    # the instance attributes the reaches use, on real objects
    scaler = torch.amp.GradScaler("cpu")
    sgd = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)
    _compat.gradscaler_forget_unscale(scaler, sgd)
    assert math.isfinite(scaler.get_scale())




def test_compat_version_guard_warns_once_per_process_about_a_newer_library(monkeypatch):
    # It runs on every update (mark_optimizer_stepped): the comparison is made once, the warning given once.
    monkeypatch.setitem(_compat.CHECKED, "torch", "1.0")
    monkeypatch.setattr(_compat, "_guarded", set())
    opt = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.warns(RuntimeWarning, match=r"checked up to 1\.0; torch .* is newer"):
        _compat.mark_optimizer_stepped(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _compat.mark_optimizer_stepped(opt)
    assert opt._opt_called and _compat._guarded == {"torch"}
@pytest.mark.parametrize("foreach", [False, True])
def test_ascend_can_keep_the_gradient_memory_for_the_second_pass(foreach):
    """set_to_none=False: the same grad tensors, zeroed, receive the second backward; same update."""
    m1, x, y = make()
    m2 = copy.deepcopy(m1)
    runs = []
    for model, keep in ((m1, True), (m2, False)):
        pert = Perturbation(model.named_parameters(), rho=0.5, foreach=foreach)
        base = torch.optim.SGD(model.parameters(), lr=0.1)
        loss_of(model, x, y).backward()
        ids = [id(p.grad) for p in model.parameters()]
        pert.ascend(set_to_none=not keep)
        if keep:
            assert [id(p.grad) for p in model.parameters()] == ids
            assert all(float(p.grad.abs().sum()) == 0 for p in model.parameters())
        else:
            assert all(p.grad is None for p in model.parameters())
        loss_of(model, x, y).backward()
        if keep:
            assert [id(p.grad) for p in model.parameters()] == ids
        pert.restore()
        base.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_release_freed_host_memory_returns_heap_pages_to_the_os():
    """What the fairseq task does after the ascent on the CPU: freed gradient-sized blocks that glibc kept on
    the heap (its dynamic mmap threshold rose) stop counting in RSS once released."""
    import subprocess
    import sys

    code = """
import torch
from fairseq_asam import _compat
def rss():
    return int([l for l in open('/proc/self/status') if l.startswith('VmRSS:')][0].split()[1]) // 1024
for size in (1 << 22, 1 << 21, 1 << 20):                # freed mmapped blocks raise glibc's mmap threshold
    big = torch.ones(size); del big
grads = [torch.ones(1 << 16) for _ in range(400)]        # 100 MiB of 256 KiB "gradients", now on the heap
pin = torch.ones(1 << 16)                                # allocated after them: it keeps the heap's top
before = rss(); del grads
kept = rss()
assert _compat.release_freed_host_memory()
print(before, kept, rss())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, kept, after = map(int, out.stdout.split())
    assert before - kept < 20  # freeing alone gives (almost) nothing back
    assert kept - after > 80  # the release does
