"""The SAM/ASAM core step against closed forms (paper Section 4, Eq. 5), and its guarantees."""

import copy
import io
import itertools
import math

import pytest
import torch
from torch import nn

from fairseq_asam import ASAM, SAM
from fairseq_asam.core import perturbation, resolve_params

INF = float("inf")


class Small(nn.Module):
    """A conv layer, a norm layer, a linear layer, biases: every kind of parameter the core treats."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.norm = nn.LayerNorm(12)
        self.fc = nn.Linear(12, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc(self.norm(h))


def make(seed=0):
    torch.manual_seed(seed)
    model = Small().double()
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64)
    return model, x, y


def loss_of(model, x, y):
    return ((model(x) - y) ** 2).mean()


def one(model, opt, x, y):
    """One two-pass update by hand: ascent, second backward, descent."""
    loss_of(model, x, y).backward()
    opt.ascent_step()
    loss_of(model, x, y).backward()
    opt.descent_step()


def closed_form_eps(model, grads, *, rho, eta, p, normalization, normalize_bias, adaptive):
    """eps computed directly from the paper's formulas, one tensor at a time, no core code."""
    ts = []
    for name, w in model.named_parameters():
        w = w.detach()
        is_bias = name.endswith("bias")
        if not adaptive or (is_bias and not normalize_bias):
            t = torch.ones_like(w)
        elif normalization == "filter" and w.dim() >= 3:
            t = torch.stack([f.norm() + eta for f in w]).reshape(-1, *([1] * (w.dim() - 1))).expand_as(w)
        else:
            t = w.abs() + eta
        ts.append(t)
    if p == 2:
        norm = math.sqrt(sum(float(((t * g) ** 2).sum().detach()) for t, g in zip(ts, grads)))
        return [rho * t * t * g / norm for t, g in zip(ts, grads)]
    return [rho * t * torch.sign(g) for t, g in zip(ts, grads)]


COMBOS = [
    dict(adaptive=True, p=p, normalization=n, normalize_bias=b)
    for p, n, b in itertools.product([2, INF], ["element", "filter"], [False, True])
] + [dict(adaptive=False, p=2, normalization="element", normalize_bias=False),
     dict(adaptive=False, p=INF, normalization="element", normalize_bias=False)]


def build(model, combo, rho, lr=0.0, foreach=None, base_cls=torch.optim.SGD):
    base = base_cls(model.parameters(), lr=lr)
    if combo["adaptive"]:
        return ASAM(model.named_parameters(), base, rho=rho, eta=0.01, p=combo["p"],
                    normalization=combo["normalization"], normalize_bias=combo["normalize_bias"], foreach=foreach)
    return SAM(model.named_parameters(), base, rho=rho, p=combo["p"], foreach=foreach)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_perturbation_equals_closed_form(combo, foreach):
    model, x, y = make()
    rho = 0.3
    opt = build(model, combo, rho, foreach=foreach)
    w0 = [p.detach().clone() for p in model.parameters()]
    loss_of(model, x, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    expected = closed_form_eps(model, grads, rho=rho, eta=0.01, **combo)
    assert opt.ascent_step() is True
    got = [p.detach() - w for p, w in zip(model.parameters(), w0)]
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    # The logged ||eps||_2 is the norm of what was added.
    assert float(opt.last_eps_norm) == pytest.approx(math.sqrt(sum(float((e**2).sum()) for e in expected)), rel=1e-9)
    # p = 2: eps lies on the boundary of the region, ||T^{-1} eps||_2 = rho.
    if combo["p"] == 2 and combo["adaptive"] and combo["normalization"] == "element" and combo["normalize_bias"]:
        t_inv_eps = [e / (w.abs() + 0.01) for e, w in zip(expected, w0)]
        assert math.sqrt(sum(float((v**2).sum()) for v in t_inv_eps)) == pytest.approx(rho, rel=1e-9)
    # the grads are cleared for the second pass
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_kernels_equal_the_one_definition_of_t_w(combo, foreach):
    # T_w is defined once (core.operator.normalization_operator, from the specs of core.params); the
    # kernels fold it into their arithmetic. eps from that definition must be what each kernel applies.
    from fairseq_asam.core import normalization_operator

    model, x, y = make(seed=5)
    opt = build(model, combo, 0.4, foreach=foreach)
    w0 = [p.detach().clone() for p in model.parameters()]
    loss_of(model, x, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    kinds = [opt.perturbation.spec(p).kind for p in model.parameters()]
    T = normalization_operator(w0, kinds, 0.01 if combo["adaptive"] else 0.0)
    if combo["p"] == 2:
        norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(T, grads)))
        want = [0.4 * t * t * g / norm for t, g in zip(T, grads)]
    else:
        want = [0.4 * t * torch.sign(g) for t, g in zip(T, grads)]
    assert opt.ascent_step()
    for p, w, e in zip(model.parameters(), w0, want):
        torch.testing.assert_close(p.detach() - w, e, rtol=1e-9, atol=1e-12)


# Both kernels do the same arithmetic: float64 results agree to 1e-12, float32 ones to float32 rounding.
TOLERANCE = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=1e-6, atol=1e-7)}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_loop_kernel_equals_foreach_kernel(combo, dtype):
    results = []
    for foreach in (False, True):
        model, x, y = make(seed=3)
        model, x, y = model.to(dtype), x.to(dtype), y.to(dtype)
        opt = build(model, combo, 0.5, lr=1e-2, foreach=foreach, base_cls=torch.optim.Adam)
        for _ in range(3):
            loss_of(model, x, y).backward()
            opt.ascent_step()
            perturbed = [p.detach().clone() for p in model.parameters()]
            loss_of(model, x, y).backward()
            opt.descent_step()
        results.append((perturbed, [p.detach().clone() for p in model.parameters()]))
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        torch.testing.assert_close(a, b, **TOLERANCE[dtype])


def test_perturbation_function_matches_optimizer():
    model, x, y = make()
    loss_of(model, x, y).backward()
    params = list(model.parameters())
    grads = [p.grad.clone() for p in params]
    specs = resolve_params(model.named_parameters(), adaptive=True, normalization="filter", normalize_bias=False)
    kinds = [s.kind for _, s in specs]
    a = perturbation(params, grads, rho=0.2, p=2, kinds=kinds, foreach=False)
    b = perturbation(params, grads, rho=0.2, p=2, kinds=kinds, foreach=True)
    expected = closed_form_eps(model, grads, rho=0.2, eta=0.01, p=2, normalization="filter",
                               normalize_bias=False, adaptive=True)
    for u, v, e in zip(a, b, expected):
        torch.testing.assert_close(u, e, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(v, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("combo", COMBOS[:2] + COMBOS[-2:], ids=str)
def test_ascent_descent_restores_weights_bitwise(combo, foreach):
    model, x, y = make()
    model.float()
    x, y = x.float(), y.float()
    opt = build(model, combo, rho=2.0, lr=0.0, foreach=foreach)  # large rho: w + eps - eps != w in floats
    w0 = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        loss_of(model, x, y).backward()
        opt.ascent_step()
        assert any(not torch.equal(p, w) for p, w in zip(model.parameters(), w0))
        loss_of(model, x, y).backward()
        opt.descent_step()
        for p, w in zip(model.parameters(), w0):
            assert torch.equal(p, w)  # bit for bit


def test_descent_steps_base_with_gradient_at_perturbed_point():
    model, x, y = make()
    ref = copy.deepcopy(model)
    opt = ASAM(model.named_parameters(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.4)
    loss_of(model, x, y).backward()
    opt.ascent_step()
    perturbed = copy.deepcopy(model)
    loss_of(model, x, y).backward()
    opt.descent_step()
    loss_of(perturbed, x, y).backward()
    for p, r, q in zip(model.parameters(), ref.parameters(), perturbed.parameters()):
        torch.testing.assert_close(p.detach(), r.detach() - 0.1 * q.grad, rtol=1e-12, atol=1e-14)


def test_step_closure_equals_manual_two_passes():
    m1, x, y = make()
    m2 = copy.deepcopy(m1)
    o1 = ASAM(m1.named_parameters(), torch.optim.SGD(m1.parameters(), lr=0.05, momentum=0.9), rho=0.5)
    o2 = ASAM(m2.named_parameters(), torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9), rho=0.5)

    def closure():
        o1.zero_grad()
        loss = loss_of(m1, x, y)
        loss.backward()
        return loss

    for _ in range(3):
        first = o1.step(closure)
        l2 = loss_of(m2, x, y)
        l2.backward()
        o2.first_step()
        loss_of(m2, x, y).backward()
        o2.second_step()
        assert float(first) == pytest.approx(float(l2), rel=1e-12)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def _mlp(widths, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1], bias=False), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).double()


@pytest.mark.parametrize("p", [2, INF])
def test_theorem1_asam_perturbation_is_scale_equivariant_sam_is_not(p):
    """Paper Theorem 1 / Eq. 5: for a node-wise rescaling A with L(Aw) = L(w) and eta = 0, eps(Aw) = A eps(w)."""
    torch.manual_seed(1)
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randn(16, 3, dtype=torch.float64)
    net = _mlp([5, 7, 3])
    scaled = copy.deepcopy(net)
    c = torch.rand(7, dtype=torch.float64) * 4 + 0.25
    with torch.no_grad():
        scaled[0].weight.mul_(c[:, None])  # row i of layer 1 by c_i
        scaled[2].weight.div_(c[None, :])  # column i of layer 2 by 1/c_i
    scale = [c[:, None].expand(7, 5), (1 / c)[None, :].expand(3, 7)]
    torch.testing.assert_close(net(x), scaled(x), rtol=1e-12, atol=1e-12)  # the loss is unchanged

    def eps_of(model, cls, **kw):
        opt = cls(model.named_parameters(), torch.optim.SGD(model.parameters(), lr=0.0), p=p, **kw)
        w0 = [q.detach().clone() for q in model.parameters()]
        ((model(x) - y) ** 2).mean().backward()
        opt.ascent_step()
        eps = [q.detach() - w for q, w in zip(model.parameters(), w0)]
        opt.restore()
        return eps

    e, es = eps_of(net, ASAM, rho=0.5, eta=0.0), eps_of(scaled, ASAM, rho=0.5, eta=0.0)
    for a, s, b in zip(es, scale, e):
        torch.testing.assert_close(a, s * b, rtol=1e-9, atol=1e-13)
    e, es = eps_of(net, SAM, rho=0.05), eps_of(scaled, SAM, rho=0.05)
    err = max(float((a - s * b).abs().max()) for a, s, b in zip(es, scale, e))
    assert err > 1e-3


def test_state_dict_round_trip_lockstep():
    m1, x, y = make()
    o1 = ASAM(m1.named_parameters(), torch.optim.Adam(m1.parameters(), lr=1e-2), rho=0.3)

    for _ in range(4):
        one(m1, o1, x, y)
    m2 = copy.deepcopy(m1)
    o2 = ASAM(m2.named_parameters(), torch.optim.Adam(m2.parameters(), lr=1.0), rho=0.9)
    # through bytes, as a checkpoint does (torch's state_dict() returns references, not copies)
    buf = io.BytesIO()
    torch.save(o1.state_dict(), buf)
    buf.seek(0)
    o2.load_state_dict(torch.load(buf))
    assert o2.rho == 0.3 and o2.param_groups[0]["lr"] == 1e-2
    assert o2.param_groups is o2.base_optimizer.param_groups
    for _ in range(4):
        one(m1, o1, x, y)
        one(m2, o2, x, y)
        for a, b in zip(m1.parameters(), m2.parameters()):
            assert torch.equal(a, b)


def test_lr_scheduler_on_the_wrapper_drives_the_base():
    model, x, y = make()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = ASAM(model.named_parameters(), base, rho=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        loss_of(model, x, y).backward()
        opt.ascent_step()
        loss_of(model, x, y).backward()
        opt.descent_step()
        sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.025)


def test_params_without_grad_are_left_alone_and_zero_grad_gives_zero_eps():
    model, x, y = make()
    model.fc.weight.requires_grad_(False)
    opt = ASAM(model.named_parameters(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5)
    w = model.fc.weight.detach().clone()
    loss_of(model, x, y).backward()
    assert opt.ascent_step()
    assert torch.equal(model.fc.weight, w)
    opt.restore()
    opt.zero_grad()
    # an all-zero gradient: eps = 0, nothing NaN
    for q in model.parameters():
        q.grad = torch.zeros_like(q)
    w0 = [q.detach().clone() for q in model.parameters()]
    assert opt.ascent_step()
    assert all(torch.equal(q, w) for q, w in zip(model.parameters(), w0))
    assert float(opt.last_eps_norm) == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("foreach", [False, True])
def test_nonfinite_gradient_skips_ascent(bad, foreach):
    model, x, y = make()
    opt = ASAM(model.named_parameters(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5, foreach=foreach)
    w0 = [q.detach().clone() for q in model.parameters()]
    loss_of(model, x, y).backward()
    model.fc.weight.grad[0, 0] = bad
    assert opt.ascent_step() is False
    assert opt.last_grad_finite is False
    assert all(torch.equal(q, w) for q, w in zip(model.parameters(), w0))

    def closure():
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        model.fc.weight.grad[0, 0] = bad
        return loss

    opt.step(closure)  # the whole update is skipped
    assert all(torch.equal(q, w) for q, w in zip(model.parameters(), w0))


def test_unnamed_parameters_rule():
    model, _, _ = make()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="cannot tell whether the 1-D parameter"):
        ASAM(model.parameters(), base)
    # SAM does not care, nor does ASAM with bias normalization
    SAM(model.parameters(), base)
    ASAM(model.parameters(), base, normalize_bias=True)
    # explicit groups decide
    groups = [
        {"params": [p for p in model.parameters() if p.dim() == 1 and p is not model.norm.weight], "is_bias": True},
        {"params": [p for p in model.parameters() if p.dim() > 1 or p is model.norm.weight], "is_bias": False},
    ]
    named = {id(p): s for p, s in resolve_params(model.named_parameters(), adaptive=True,
                                                  normalization="element", normalize_bias=False)}
    grouped = {id(p): s for p, s in resolve_params(groups, adaptive=True, normalization="element",
                                                    normalize_bias=False)}
    assert {k: v.kind for k, v in named.items()} == {k: v.kind for k, v in grouped.items()}
    assert named[id(model.norm.weight)].kind == "element" and named[id(model.norm.bias)].kind == "none"


def test_works_with_fairseq_adam_and_adamw():
    fairseq_adam = pytest.importorskip("fairseq.optim.adam")
    for cls in (fairseq_adam.Adam, torch.optim.AdamW):
        model, x, y = make()
        opt = ASAM(model.named_parameters(), cls(model.parameters(), lr=1e-2), rho=0.5)
        before = float(loss_of(model, x, y))

        def closure(m=model, o=opt, x=x, y=y):
            o.zero_grad()
            loss = loss_of(m, x, y)
            loss.backward()
            return loss

        for _ in range(20):
            opt.step(closure)
        assert float(loss_of(model, x, y)) < before


def test_one_persistent_buffer_reused_and_weights_stay_in_their_storage():
    """One extra buffer per parameter for the whole run, reused; the weights never leave their storage
    (the ascent writes w + eps into it and the restore copies w back), so nothing that holds it goes stale."""
    model, x, y = make()
    opt = ASAM(model.named_parameters(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5)
    params = list(model.parameters())
    home = [p.data_ptr() for p in params]
    bufs = None
    for _ in range(3):
        loss_of(model, x, y).backward()
        opt.ascent_step()
        assert [p.data_ptr() for p in params] == home
        now = [opt.perturbation._buffers[id(p)].data_ptr() for p in params]
        assert bufs is None or now == bufs
        bufs = now
        loss_of(model, x, y).backward()
        opt.descent_step()
        assert [p.data_ptr() for p in params] == home
    n_params = sum(p.numel() for p in model.parameters())
    assert sum(v.numel() for v in opt.perturbation._buffers.values()) == n_params


def _base(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


BAD = [
    (dict(rho=0.0), "rho= must be > 0, got 0"),
    (dict(rho=-1), "rho= must be > 0, got -1"),
    (dict(rho=float("nan")), "rho= must be a finite number > 0, got nan"),
    (dict(rho="0.5"), "rho= must be a number, got '0.5'"),
    (dict(eta=-0.1), "eta= must be a finite number >= 0, got -0.1"),
    (dict(p=1), "p= must be 2 or inf, got 1"),
    (dict(p="two"), "p= must be 2 or inf, got 'two'"),
    (dict(normalization="layer"), "normalization= must be one of element, filter, got 'layer'"),
    (dict(normalize_bias="yes"), "normalize_bias= must be True or False, got 'yes'"),
    (dict(foreach="auto"), "foreach= must be None, True or False, got 'auto'"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m for _, m in BAD])
def test_bad_arguments(kwargs, message):
    model, _, _ = make()
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ASAM(model.named_parameters(), _base(model), **kwargs)


def test_bad_base_optimizer_and_step_without_closure():
    model, _, _ = make()
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="same parameters"):
        ASAM(model.named_parameters(), torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="same parameters"):
        ASAM(model.named_parameters(), torch.optim.SGD(list(model.parameters())[:-1], lr=0.1))
    with pytest.raises(ValueError, match="base_optimizer"):
        ASAM(model.named_parameters(), "sgd")
    with pytest.raises(ValueError, match="rho= must be > 0"):
        SAM(model.named_parameters(), _base(model), rho=-0.05)
    opt = ASAM(model.named_parameters(), _base(model))
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()


@pytest.mark.slow
@pytest.mark.parametrize("cls,rho", [(SAM, 0.05), (ASAM, 0.5)])
def test_short_training_run_decreases_loss(cls, rho):
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x[:, :3].sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = cls(model.named_parameters(), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=rho)
    loss_fn = nn.CrossEntropyLoss()
    start = float(loss_fn(model(x), y))
    for i in range(300):
        idx = torch.arange(i * 32, i * 32 + 32) % 256

        def closure(idx=idx):
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            return loss

        opt.step(closure)
    end = float(loss_fn(model(x), y))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert end < 0.5 * start


@pytest.mark.parametrize("foreach", [False, True])
def test_fp16_weights_and_grads_do_not_overflow(foreach):
    """T^2 g in fp16 overflows (> 65504) for |w| ~ 40 and g ~ 100; eps itself is small and must come out right."""
    torch.manual_seed(0)
    w64 = torch.randn(64, 32, dtype=torch.float64) * 40
    g64 = torch.randn(64, 32, dtype=torch.float64) * 100
    b64, gb64 = torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    w, b = nn.Parameter(w64.half()), nn.Parameter(b64.half())
    w.grad, b.grad = g64.half(), gb64.half()
    opt = ASAM([("fc.weight", w), ("fc.bias", b)], torch.optim.SGD([w, b], lr=0.0), rho=0.5, foreach=foreach)
    assert opt.ascent_step()
    t_w, t_b = w64.half().double().abs() + 0.01, torch.ones_like(b64)
    gw, gb = g64.half().double(), gb64.half().double()
    norm = math.sqrt(float(((t_w * gw) ** 2).sum() + ((t_b * gb) ** 2).sum()))
    eps_w = 0.5 * t_w * t_w * gw / norm
    assert torch.isfinite(w).all() and torch.isfinite(b).all()
    torch.testing.assert_close((w.double() - w64.half().double()), eps_w, rtol=2e-2, atol=0.05)
    opt.restore()
    assert torch.equal(w, w64.half())


def test_load_state_dict_from_a_live_optimizer_and_from_a_plain_base_state():
    """Loading another optimizer's live state must not make the two share moment tensors."""
    m1, x, y = make()
    o1 = ASAM(m1.named_parameters(), torch.optim.Adam(m1.parameters(), lr=1e-2), rho=0.3)

    for _ in range(3):
        one(m1, o1, x, y)
    m2, m3 = copy.deepcopy(m1), copy.deepcopy(m1)
    o2 = ASAM(m2.named_parameters(), torch.optim.Adam(m2.parameters(), lr=1e-2), rho=0.3)
    o2.load_state_dict(o1.state_dict())
    # a plain Adam state dict switches a run from Adam to ASAM
    o3 = ASAM(m3.named_parameters(), torch.optim.Adam(m3.parameters(), lr=1.0), rho=0.3)
    o3.load_state_dict(o1.base_optimizer.state_dict())
    assert o3.param_groups is o3.base_optimizer.param_groups and o3.param_groups[0]["lr"] == 1e-2
    for _ in range(3):
        for m, o in ((m1, o1), (m2, o2), (m3, o3)):
            one(m, o, x, y)
    for a, b, c in zip(m1.parameters(), m2.parameters(), m3.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    m4 = copy.deepcopy(m1)
    sam = SAM(m4.named_parameters(), torch.optim.Adam(m4.parameters(), lr=1e-2))
    with pytest.raises(ValueError, match="saved by ASAM"):
        sam.load_state_dict(o1.state_dict())
