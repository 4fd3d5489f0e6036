"""measure_sharpness: closed forms (quadratic, linear), Theorem 1, exact restore, determinism, bad input."""

import math

import pytest
import torch

from fairseq_asam import ASAM
from fairseq_asam.sharpness import measure_sharpness

INF = float("inf")


class Vector(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())


def quad_loss(A):
    return lambda m, batch: 0.5 * m.w @ A @ m.w


def spd(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T


# ---- closed forms -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_quadratic_p2_equals_rho2_lambda_max_over_2(seed):
    # L = 1/2 w^T A w at w = 0: max over ||eps||_2 <= rho of 1/2 eps^T A eps = rho^2 lambda_max / 2,
    # reached at rho * (top eigenvector). The gradient at w = 0 is zero, so the ascent starts at random.
    A = spd([3.0, 1.0, 0.5, 0.2, 0.1, 0.0], seed=seed)
    model = Vector(torch.zeros(6, dtype=torch.float64))
    rho = 0.3
    r = measure_sharpness(model, quad_loss(A), [None], rho=rho, adaptive=False, seed=seed)
    closed = rho**2 * 3.0 / 2
    assert r.value <= closed * (1 + 1e-12)
    assert r.value == pytest.approx(closed, rel=1e-4)
    # The maximizer is on the sphere, along the top eigenvector.
    eps = r.eps[0]
    assert float(eps.norm()) == pytest.approx(rho, rel=1e-9)
    top = torch.linalg.eigh(A).eigenvectors[:, -1]
    assert abs(float(eps @ top)) / rho == pytest.approx(1.0, abs=1e-4)
    # One step is not enough from a random start: the later steps are what reach the closed form.
    one = measure_sharpness(model, quad_loss(A), [None], rho=rho, adaptive=False, seed=seed, steps=1)
    assert one.value < closed * (1 - 1e-3)


def test_quadratic_adaptive_at_zero_uses_eta_ball():
    # At w = 0, T_w = eta I: the ellipsoid is the ball of radius rho * eta, closed form (rho eta)^2 lambda_max / 2.
    A = spd([2.0, 0.5, 0.25, 0.0], seed=3)
    model = Vector(torch.zeros(4, dtype=torch.float64))
    r = measure_sharpness(model, quad_loss(A), [None], rho=2.0, eta=0.1, adaptive=True, steps=20)
    assert r.value == pytest.approx((2.0 * 0.1) ** 2 * 2.0 / 2, rel=1e-4)


@pytest.mark.parametrize("adaptive", [False, True])
def test_quadratic_inf_ball_diagonal_corner(adaptive):
    # p = inf and A diagonal PSD: the max over the cube is at a corner, rho^2 trace(A) / 2 (times eta^2 adaptive at 0).
    lam = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    model = Vector(torch.zeros(3, dtype=torch.float64))
    r = measure_sharpness(model, quad_loss(torch.diag(lam)), [None], rho=0.5, p=INF, adaptive=adaptive, eta=0.5)
    scale = 0.5**2 * (0.5**2 if adaptive else 1.0)
    assert r.value == pytest.approx(scale * float(lam.sum()) / 2, rel=1e-12)


def _conv_and_linear_loss():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, kernel_size=2).double()
    g_w = torch.randn_like(conv.weight)
    g_b = torch.randn_like(conv.bias)

    def loss(m, batch):
        return (m.weight * g_w).sum() + (m.bias * g_b).sum() + 1.0

    return conv, loss, g_w, g_b


@pytest.mark.parametrize("p", [2, INF])
@pytest.mark.parametrize("mode", ["sam", "element", "filter", "element+bias"])
def test_linear_loss_closed_form(p, mode):
    # L(w) = <g, w>: the max over ||T^-1 eps||_p <= rho is rho ||T g||_q (q the dual of p): q = 2 or 1.
    conv, loss, g_w, g_b = _conv_and_linear_loss()
    eta = 0.05
    w = conv.weight.detach()
    if mode == "sam":
        t_w, t_b = torch.ones_like(w), torch.ones_like(g_b)
    elif mode == "filter":
        t_w = (w.reshape(3, -1).norm(dim=1) + eta).reshape(3, 1, 1, 1).expand_as(w)
        t_b = torch.ones_like(g_b)
    else:
        t_w = w.abs() + eta
        t_b = conv.bias.detach().abs() + eta if mode == "element+bias" else torch.ones_like(g_b)
    tg = torch.cat([(t_w * g_w).flatten(), (t_b * g_b).flatten()])
    closed = 0.7 * float(tg.norm(2 if p == 2 else 1))
    kwargs = dict(
        rho=0.7,
        p=p,
        adaptive=mode != "sam",
        eta=eta,
        normalization="filter" if mode == "filter" else "element",
        normalize_bias=mode == "element+bias",
    )
    # The closed-form first step (the core's ascent direction) is already exact for a linear loss ...
    r0 = measure_sharpness(conv, loss, [None], steps=0, **kwargs)
    assert r0.value == pytest.approx(closed, rel=1e-12)
    # ... and further steps and restarts must not move away from it.
    r = measure_sharpness(conv, loss, [None], steps=5, restarts=2, **kwargs)
    assert r.value == pytest.approx(closed, rel=1e-12)
    assert r.eps_norm == pytest.approx(0.7, rel=1e-12)


def test_zero_steps_equals_one_asam_ascent_step():
    # steps=0 is the training-time estimate: L(w + eps) - L(w) with eps from ASAM.ascent_step().
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3)).double()
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))

    def loss(m, batch):
        return torch.nn.functional.cross_entropy(m(batch[0]), batch[1])

    r = measure_sharpness(model, loss, [(x, y)], rho=0.5, eta=0.01, steps=0)
    opt = ASAM(model.named_parameters(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5, eta=0.01)
    base = loss(model, (x, y))
    base.backward()
    opt.ascent_step()
    with torch.no_grad():
        perturbed = loss(model, (x, y))
    opt.restore()
    assert r.value == pytest.approx(float(perturbed - base.detach()), rel=1e-12, abs=1e-15)


# ---- Theorem 1 ----------------------------------------------------------------------------------


def _relu_mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 10, bias=False),
        torch.nn.ReLU(),
        torch.nn.Linear(10, 8, bias=False),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 3, bias=False),
    ).double()


def _rescale_nodes(model, seed):
    # Node-wise rescaling: hidden unit i of a layer multiplied by a_i > 0 on its incoming weights and
    # divided by a_i on its outgoing ones; ReLU(a z) = a ReLU(z), so the function is unchanged.
    g = torch.Generator().manual_seed(seed)
    lin = [m for m in model if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for first, second in zip(lin[:-1], lin[1:]):
            a = torch.exp(torch.randn(first.out_features, generator=g, dtype=torch.float64) * 1.5)
            first.weight.mul_(a[:, None])
            second.weight.div_(a[None, :])


@pytest.mark.parametrize("p", [2, INF])
def test_theorem1_adaptive_sharpness_is_scale_invariant(p):
    model = _relu_mlp(0)
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)) for _ in range(2)]

    def loss(m, batch):
        return torch.nn.functional.cross_entropy(m(batch[0]), batch[1])

    kw = dict(rho=0.5 if p == 2 else 0.05, p=p, steps=8, restarts=1, seed=3)
    a0 = measure_sharpness(model, loss, data, adaptive=True, eta=0.0, **kw)
    s0 = measure_sharpness(model, loss, data, adaptive=False, **kw)
    out0 = model(data[0][0])
    _rescale_nodes(model, seed=11)
    assert torch.allclose(model(data[0][0]), out0, rtol=1e-12, atol=1e-12)  # the same function
    a1 = measure_sharpness(model, loss, data, adaptive=True, eta=0.0, **kw)
    s1 = measure_sharpness(model, loss, data, adaptive=False, **kw)
    assert a0.value > 1e-3
    assert a1.value == pytest.approx(a0.value, rel=1e-9)
    for t0, t1 in zip(a0.losses, a1.losses):  # the whole ascent is the same in normalized coordinates
        assert t1 == pytest.approx(t0, rel=1e-8, abs=1e-12)
    assert abs(s1.value - s0.value) > 0.1 * max(s0.value, s1.value)


# ---- restore, determinism -----------------------------------------------------------------------


def test_weights_modes_grads_restored_and_deterministic():
    torch.manual_seed(2)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.Dropout(0.5), torch.nn.ReLU(), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 2)
    )
    model.train()
    model[3].eval()  # a mixed state must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)
    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(3)]

    def loss(m, batch):
        return torch.nn.functional.cross_entropy(m(batch[0]), batch[1])

    r1 = measure_sharpness(model, loss, iter(data), rho=0.2, restarts=2, seed=4, steps=4)
    r2 = measure_sharpness(model, loss, data, rho=0.2, restarts=2, seed=4, steps=4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # bit for bit, buffers included
    assert [m.training for m in model] == [True, True, True, False, True]
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 7.0))
    assert model[4].weight.grad is None
    assert r1.value == r2.value and r1.losses == r2.losses  # deterministic for a seed
    assert all(torch.equal(a, b) for a, b in zip(r1.eps, r2.eps))
    r3 = measure_sharpness(model, loss, data, rho=0.2, restarts=2, seed=5, steps=4)
    assert r3.losses[0] == r1.losses[0]  # start 0 is the closed form, seed-independent
    assert r3.losses[1] != r1.losses[1]  # the random restarts are not
    r0 = measure_sharpness(model, loss, data, rho=0.2, restarts=0, steps=4)
    assert r1.value >= r0.value  # restarts only add candidates
    assert len(r1.losses) == 3 and all(len(t) == 5 for t in r1.losses)
    assert r1.value == max(max(t) for t in r1.losses)
    # eval mode while measuring: without it dropout would make the objective noisy and r1 != r2.
    assert r1.loss == pytest.approx(sum(float(loss(model.eval(), b).detach()) for b in data) / 3, rel=1e-6)
    model.train()


def test_weighted_batches_average_like_the_full_data():
    torch.manual_seed(3)
    model = torch.nn.Linear(3, 1).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    batches = [(x[:2], y[:2]), (x[2:], y[2:])]

    def weighted(m, b):
        return torch.nn.functional.mse_loss(m(b[0]), b[1]), len(b[0])

    def full(m, b):
        return torch.nn.functional.mse_loss(m(x), y)

    rw = measure_sharpness(model, weighted, batches, rho=0.1, steps=3)
    rf = measure_sharpness(model, full, [None], rho=0.1, steps=3)
    assert rw.loss == pytest.approx(rf.loss, rel=1e-12)
    assert rw.value == pytest.approx(rf.value, rel=1e-9)


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rho=0), "rho"),
        (dict(rho=-1.0), "rho"),
        (dict(rho=float("nan")), "rho"),
        (dict(rho=0.1, p=1), "p"),
        (dict(rho=0.1, eta=-0.1), "eta"),
        (dict(rho=0.1, steps=-1), "steps"),
        (dict(rho=0.1, steps=2.5), "steps"),
        (dict(rho=0.1, restarts=-2), "restarts"),
        (dict(rho=0.1, seed=-1), "seed"),
        (dict(rho=0.1, normalization="layer"), "normalization"),
        (dict(rho=0.1, adaptive="yes"), "adaptive"),
        (dict(rho=0.1, step_size=0), "step_size"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match=match):
        measure_sharpness(model, lambda m, b: m(b).sum(), [torch.ones(1, 2)], **kwargs)


def test_bad_data_and_loss_raise_and_restore():
    model = torch.nn.Linear(2, 1)
    before = model.weight.detach().clone()
    with pytest.raises(ValueError, match="empty"):
        measure_sharpness(model, lambda m, b: m(b).mean(), [], rho=0.1)
    with pytest.raises(ValueError, match="not finite"):
        measure_sharpness(model, lambda m, b: m(b).mean() * math.inf, [torch.ones(1, 2)], rho=0.1)
    with pytest.raises(ValueError, match="scalar"):
        measure_sharpness(model, lambda m, b: m(b), [torch.ones(3, 2)], rho=0.1)
    calls = []

    def explode(m, b):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("boom")
        return m(b).mean()

    with pytest.raises(RuntimeError, match="boom"):
        measure_sharpness(model, explode, [torch.ones(1, 2)], rho=0.1)
    assert torch.equal(model.weight.detach(), before) and model.training


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: checks the measure on cuda equals the CPU one")
def test_cuda_matches_cpu():
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.ReLU(), torch.nn.Linear(9, 2)).double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 2, (20,))

    def loss(m, batch):
        return torch.nn.functional.cross_entropy(m(batch[0]), batch[1])

    kw = dict(rho=0.3, steps=5, restarts=1, seed=2)
    cpu = measure_sharpness(model, loss, [(x, y)], **kw)
    model.cuda()
    before = [p.detach().clone() for p in model.parameters()]
    gpu = measure_sharpness(model, loss, [(x.cuda(), y.cuda())], **kw)
    assert gpu.value == pytest.approx(cpu.value, rel=1e-9)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("fails", [False, True], ids=["measures", "raises"])
def test_tf32_is_off_while_measuring_and_restored(fails):
    # The measure is a difference of two losses; TF32 (cuDNN convolutions use it by default on Ampere and later)
    # keeps 10 mantissa bits, enough to move it by more than its size on a flat model. It is switched off for
    # the measurement and the caller's setting comes back, also when the measurement fails.
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    seen = []
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(12, 2))
    data = [(torch.randn(4, 2, 4, 4), torch.randint(0, 2, (4,)))]

    def loss(m, batch):
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        if fails and len(seen) > 1:
            raise RuntimeError("boom")
        return torch.nn.functional.cross_entropy(m(batch[0]), batch[1])

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        if fails:
            with pytest.raises(RuntimeError, match="boom"):
                measure_sharpness(model, loss, data, rho=0.5, steps=2)
        else:
            measure_sharpness(model, loss, data, rho=0.5, steps=2)
        assert seen and all(s == (False, False) for s in seen)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class _Batch:
    """A batch that can be weak-referenced, to count how many are alive at once."""

    def __init__(self, x, y):
        self.x, self.y = x, y


class _LazySource:
    """Re-iterable: every pass builds its batches one at a time, as a streaming loader does."""

    def __init__(self, xs, ys):
        import weakref

        self.xs, self.ys = xs, ys
        self.alive = weakref.WeakSet()
        self.max_alive = 0
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        for x, y in zip(self.xs, self.ys):
            b = _Batch(x.clone(), y.clone())
            self.alive.add(b)
            self.max_alive = max(self.max_alive, len(self.alive))
            yield b
            del b


def test_streamed_source_gives_the_materialized_result_with_one_batch_alive():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    xs = [torch.randn(8, 5) for _ in range(6)]
    ys = [torch.randint(0, 3, (8,)) for _ in range(6)]

    def loss_fn(m, b):
        return torch.nn.functional.cross_entropy(m(b.x), b.y), float(len(b.y))

    kw = dict(rho=0.3, steps=4, restarts=1, seed=3)
    listed = measure_sharpness(model, loss_fn, [_Batch(x, y) for x, y in zip(xs, ys)], **kw)
    source = _LazySource(xs, ys)
    streamed = measure_sharpness(model, loss_fn, source, **kw)
    assert streamed.value == listed.value and streamed.loss == listed.loss
    assert streamed.losses == listed.losses and streamed.best_start == listed.best_start
    assert all(torch.equal(a, b) for a, b in zip(streamed.eps, listed.eps))
    # One pass per evaluation, and never more than the batch in use plus the one being built.
    assert source.passes == 1 + (1 + 1) * (4 + 1)
    assert source.max_alive <= 2
