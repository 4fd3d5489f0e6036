"""The vision update (fairseq_asam.vision.step): m-sharpness == the core run per shard, BatchNorm running
statistics untouched by the second pass, fp16 GradScaler across the two passes."""

import copy

import pytest
import torch
from torch import nn

from fairseq_asam import ASAM, SAM
from fairseq_asam.vision.step import frozen_bn_stats, train_step


def _net(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(24, 5),
    )
    return net.to(dtype)


def _batch(n, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g, dtype=dtype), torch.randint(0, 5, (n,), generator=g)


def _wrap(kind, model, base):
    if kind == "asam":
        return ASAM(model.named_parameters(), base, rho=0.5, eta=0.01)
    return SAM(model.named_parameters(), base, rho=0.05)


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def _per_shard_reference(model0, kind, x, y, m):
    """The core's own step(closure), once per shard on a copy of w: g'_k = w - w_k (SGD with lr 1)."""
    crit = nn.CrossEntropyLoss()
    w0 = [p.detach().clone() for p in model0.parameters()]
    total = [torch.zeros_like(p) for p in w0]
    for xs, ys in zip(x.split(m), y.split(m)):
        net = copy.deepcopy(model0)
        opt = _wrap(kind, net, torch.optim.SGD(net.parameters(), lr=1.0))

        def closure(net=net, opt=opt, xs=xs, ys=ys):
            opt.zero_grad()
            loss = crit(net(xs), ys)
            loss.backward()
            return loss

        opt.step(closure)
        for t, a, b in zip(total, w0, net.parameters()):
            t.add_(a - b.detach(), alpha=xs.shape[0] / x.shape[0])
    ref = copy.deepcopy(model0)
    base = _sgd(ref)
    for p, g in zip(ref.parameters(), total):
        p.grad = g
    base.step()
    return ref


@pytest.mark.parametrize("kind", ["asam", "sam"])
@pytest.mark.parametrize("n,m", [(12, 4), (10, 4), (8, 1)])
def test_m_sharpness_equals_core_per_shard(kind, n, m):
    model = _net()
    model0 = copy.deepcopy(model)
    x, y = _batch(n)
    opt = _wrap(kind, model, _sgd(model))
    r = train_step(model, opt, nn.CrossEntropyLoss(), x, y, m_sharpness=m)
    assert not r.skipped
    ref = _per_shard_reference(model0, kind, x, y, m)
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)
    # ...and it is not the whole-batch update: the shards matter.
    whole = copy.deepcopy(model0)
    train_step(whole, _wrap(kind, whole, _sgd(whole)), nn.CrossEntropyLoss(), x, y, m_sharpness=None)
    diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), whole.parameters()))
    assert diff > 1e-6


@pytest.mark.parametrize("kind", ["asam", "sam"])
def test_whole_batch_step_equals_core_step_closure(kind):
    model = _net()
    ref = copy.deepcopy(model)
    x, y = _batch(8)
    crit = nn.CrossEntropyLoss()
    train_step(model, _wrap(kind, model, _sgd(model)), crit, x, y, m_sharpness=8)
    ropt = _wrap(kind, ref, _sgd(ref))

    def closure():
        ropt.zero_grad()
        loss = crit(ref(x), y)
        loss.backward()
        return loss

    ropt.step(closure)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


@pytest.mark.parametrize("m", [None, 3])
def test_second_pass_leaves_bn_running_stats(m):
    model = _net()
    x, y = _batch(9)
    fwd_only = copy.deepcopy(model)
    with torch.no_grad():  # the reference: only the first-pass forwards at w, shard by shard
        for xs in (x.split(m) if m else [x]):
            fwd_only(xs)
    opt = _wrap("asam", model, _sgd(model))
    train_step(model, opt, nn.CrossEntropyLoss(), x, y, m_sharpness=m)
    bn, bn_ref = model[1], fwd_only[1]
    assert int(bn.num_batches_tracked) == (3 if m else 1)
    assert torch.equal(bn.running_mean, bn_ref.running_mean)
    assert torch.equal(bn.running_var, bn_ref.running_var)
    assert torch.equal(bn.num_batches_tracked, bn_ref.num_batches_tracked)


def test_frozen_bn_stats_same_output_and_restores_flag():
    model = _net()
    x, _ = _batch(6)
    before = model[1].running_mean.clone()
    with frozen_bn_stats(model):
        out_frozen = model(x)
        assert model[1].track_running_stats is False
    assert model[1].track_running_stats is True
    assert torch.equal(model[1].running_mean, before)
    out = model(x)  # batch statistics either way: identical output
    assert torch.equal(out, out_frozen)
    assert not torch.equal(model[1].running_mean, before)


def test_sgd_step_is_one_plain_pass():
    model = _net()
    ref = copy.deepcopy(model)
    x, y = _batch(8)
    crit = nn.CrossEntropyLoss()
    opt = _sgd(model)
    train_step(model, opt, crit, x, y)
    ropt = _sgd(ref)
    crit(ref(x), y).backward()
    ropt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def _fp16_setup(seed=0):
    model = _net(torch.float32, seed)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, ASAM(model.named_parameters(), base, rho=0.5)


def _autocast(device):
    return lambda: torch.autocast(device, dtype=torch.float16)


@pytest.mark.parametrize("m", [None, 4])
def test_fp16_nonfinite_first_pass_skips_and_backs_off(m):
    model, opt = _fp16_setup()
    w0 = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = _batch(8, torch.float32)
    x[0, 0, 0, 0] = float("inf")  # -> NaN loss and gradients
    r = train_step(model, opt, nn.CrossEntropyLoss(), x, y, m_sharpness=m, scaler=scaler, autocast=_autocast("cpu"))
    assert r.skipped
    assert scaler.get_scale() == 512.0
    for a, b in zip(model.parameters(), w0):
        assert torch.equal(a, b)
    assert opt.base_optimizer.state == {} or all("momentum_buffer" not in s for s in opt.base_optimizer.state.values())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("m", [None, 4])
def test_fp16_scaler_unscales_once(m):
    # Same update with and without loss scaling (eps is scale-invariant; the second-pass grads are
    # unscaled once by scaler.step): a missing or doubled unscale would be off by a factor 2**12.
    x, y = _batch(8, torch.float32)
    crit = nn.CrossEntropyLoss()
    model, opt = _fp16_setup()
    w0 = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=4096.0)
    r = train_step(model, opt, crit, x, y, m_sharpness=m, scaler=scaler, autocast=_autocast("cpu"))
    assert not r.skipped and scaler.get_scale() == 4096.0
    ref, ropt = _fp16_setup()
    train_step(ref, ropt, crit, x, y, m_sharpness=m, scaler=None, autocast=_autocast("cpu"))
    _assert_same_update(model, ref, w0)


def _assert_same_update(model, ref, w0):
    a = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    b = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    w = torch.cat([p.reshape(-1) for p in w0]).to(b.device)
    step = (b - w).norm()
    assert step > 1e-3
    assert (a - b).norm() <= 0.02 * step


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: fp16 autocast + GradScaler on CUDA")
def test_fp16_scaler_cuda():
    x, y = _batch(8, torch.float32)
    x, y = x.cuda(), y.cuda()
    model, opt = _fp16_setup()
    model.cuda()
    ref, ropt = _fp16_setup()
    ref.cuda()
    crit = nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler("cuda", init_scale=4096.0)
    w0 = [p.detach().clone() for p in model.parameters()]
    train_step(model, opt, crit, x, y, m_sharpness=4, scaler=scaler, autocast=_autocast("cuda"))
    train_step(ref, ropt, crit, x, y, m_sharpness=4, autocast=_autocast("cuda"))
    _assert_same_update(model, ref, w0)
    x[0, 0, 0, 0] = float("inf")
    w1 = [p.detach().clone() for p in model.parameters()]
    assert train_step(model, opt, crit, x, y, scaler=scaler, autocast=_autocast("cuda")).skipped
    assert scaler.get_scale() == 2048.0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), w1))



@pytest.mark.parametrize("m", [None, 4])
def test_skipped_update_backs_off_the_scaler_as_torch_does(m):
    # growth_interval 2 and the sequence good, overflow, good. torch's own handling (one pass, scaler.step
    # skips and update() backs off and restarts the growth count) ends at init / 2. Backing off by hand with
    # update(new_scale) left the growth count at 1, so the next good step doubled the scale straight back.
    x, y = _batch(8, torch.float32)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("inf")
    crit = nn.CrossEntropyLoss()

    def final_scale(two_pass):
        model, opt = _fp16_setup()
        if not two_pass:
            opt = opt.base_optimizer
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
        skipped = [train_step(model, opt, crit, xb, y, m_sharpness=m, scaler=scaler, autocast=_autocast("cpu")).skipped
                   for xb in (x, bad, x)]
        return scaler.get_scale(), skipped

    ref, _ = final_scale(two_pass=False)
    assert ref == 512.0
    scale, skipped = final_scale(two_pass=True)
    assert skipped == [False, True, False]
    assert scale == ref


# ---- gradient accumulation (--accum-steps) and the replayed random state -----------------------------


def _net_no_bn(seed=0, dropout=0.0):
    # No BatchNorm: a batch's output does not depend on how it is cut, so micro-batches must match exactly.
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(24, 5)).to(torch.float64)


def _opt(kind, model):
    base = _sgd(model)
    return base if kind == "sgd" else _wrap(kind, model, base)


@pytest.mark.parametrize("kind", ["sgd", "sam", "asam"])
@pytest.mark.parametrize("m", [None, 6, 2])
def test_accumulated_micro_batches_equal_one_batch(kind, m):
    if kind == "sgd" and m is not None:
        pytest.skip("m-sharpness is a SAM/ASAM notion")
    crit = nn.CrossEntropyLoss()
    whole, accum = _net_no_bn(), _net_no_bn()
    ow, oa = _opt(kind, whole), _opt(kind, accum)
    for step in range(3):  # a few updates: momentum carries any error forward
        x, y = _batch(12, seed=10 + step)
        rw = train_step(whole, ow, crit, x, y, m_sharpness=m)
        ra = train_step(accum, oa, crit, x, y, m_sharpness=m, accum_steps=3)  # 3 micro-batches of 4
        # The reported loss is the mean over the whole update, not a micro-batch's or the sum.
        torch.testing.assert_close(ra.loss, rw.loss, rtol=0, atol=1e-14)
        assert torch.equal(ra.logits, rw.logits) or torch.allclose(ra.logits, rw.logits, rtol=0, atol=1e-14)
        for (name, a), b in zip(accum.named_parameters(), whole.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"step {step}: {name}")
    if kind != "sgd":
        torch.testing.assert_close(ra.eps_norm, rw.eps_norm, rtol=0, atol=1e-12)
    # ...and not trivially: the updates moved the weights.
    assert max((a - b).abs().max().item() for a, b in zip(accum.parameters(), _net_no_bn().parameters())) > 1e-3


def test_accumulation_scales_each_micro_batch_by_its_share():
    # An uneven cut (5 examples, 2 steps: 3 + 2): the weights 3/5 and 2/5 must reproduce the batch mean.
    crit = nn.CrossEntropyLoss()
    whole, accum = _net_no_bn(), _net_no_bn()
    x, y = _batch(5)
    train_step(whole, _opt("asam", whole), crit, x, y)
    r = train_step(accum, _opt("asam", accum), crit, x, y, accum_steps=2)
    assert r.logits.shape[0] == 5
    for a, b in zip(accum.parameters(), whole.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_accum_steps_must_be_a_positive_integer(bad):
    model = _net_no_bn()
    x, y = _batch(4)
    with pytest.raises(ValueError, match=r"accum_steps must be an integer >= 1, got"):
        train_step(model, _opt("asam", model), nn.CrossEntropyLoss(), x, y, accum_steps=bad)


@pytest.mark.parametrize("accum,m", [(1, None), (2, None), (2, 3)])
def test_second_pass_replays_the_first_pass_random_state(accum, m):
    # Dropout draws from the CPU generator: with the state replayed, train_step is exactly the core's
    # step(closure) whose closure resets the generator before every forward, shard by shard.
    crit = nn.CrossEntropyLoss()
    model, ref = _net_no_bn(dropout=0.5), _net_no_bn(dropout=0.5)
    x, y = _batch(6)
    torch.manual_seed(123)
    start = torch.get_rng_state()
    train_step(model, _wrap("asam", model, _sgd(model)), crit, x, y, m_sharpness=m, accum_steps=accum)
    after = torch.get_rng_state()

    ropt = _wrap("asam", ref, _sgd(ref))
    shard = m or 6
    micro = -(-6 // accum)
    total = [torch.zeros_like(p) for p in ref.parameters()]
    w0 = [p.detach().clone() for p in ref.parameters()]
    torch.set_rng_state(start)
    for xs, ys in zip(x.split(shard), y.split(shard)):
        pieces = list(zip(xs.split(micro), ys.split(micro)))
        states = []
        ropt.zero_grad()
        for xp, yp in pieces:
            states.append(torch.get_rng_state())
            (crit(ref(xp), yp) * len(yp) / len(ys)).backward()
        after_first = torch.get_rng_state()
        ropt.ascent_step()
        for (xp, yp), st in zip(pieces, states):
            torch.set_rng_state(st)
            (crit(ref(xp), yp) * len(yp) / len(ys)).backward()
        ropt.restore()
        torch.set_rng_state(after_first)
        for t, p in zip(total, ref.parameters()):
            t.add_(p.grad, alpha=len(ys) / 6)
        ropt.zero_grad()
    assert torch.equal(torch.get_rng_state(), after)  # the generator ends where one pass leaves it
    base = _sgd(ref)
    for p, g, w in zip(ref.parameters(), total, w0):
        assert torch.equal(p.detach(), w)
        p.grad = g
    base.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # Without the replay the second pass would see other masks: the same update with fresh draws differs.
    fresh = _net_no_bn(dropout=0.5)
    fopt = _wrap("asam", fresh, _sgd(fresh))
    torch.set_rng_state(start)
    fopt.zero_grad()
    crit(fresh(x), y).backward()
    fopt.ascent_step()
    crit(fresh(x), y).backward()  # no replay
    fopt.descent_step()
    if accum == 1 and m is None:
        assert max((a - b).abs().max().item() for a, b in zip(model.parameters(), fresh.parameters())) > 1e-6


def _ddp_world_of_one(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    return dist


@pytest.mark.parametrize("kind", ["sgd", "asam"])
def test_ddp_all_reduces_only_the_last_micro_batch(tmp_path, kind):
    # A one-process gloo group: DDP's comm hook runs once per gradient bucket each time DDP all-reduces.
    dist = _ddp_world_of_one(tmp_path)
    try:
        model, ref = _net_no_bn(), _net_no_bn()
        ddp = nn.parallel.DistributedDataParallel(model)
        calls = []

        def hook(state, bucket):
            calls.append(bucket.index())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, hook)
        x, y = _batch(12)
        crit = nn.CrossEntropyLoss()
        train_step(ddp, _opt(kind, model), crit, x, y, accum_steps=3)
        assert calls == [0]  # one bucket, all-reduced once: the last micro-batch of the (second) pass
        train_step(ref, _opt(kind, ref), crit, x, y)
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    finally:
        dist.destroy_process_group()


_CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                       reason="needs a CUDA GPU: ShakeDrop draws from the CUDA generator"))


@pytest.mark.parametrize("device", ["cpu", _CUDA])
@pytest.mark.parametrize("accum,m", [(1, None), (2, None), (1, 2), (2, 4)])
def test_shakedrop_draws_are_the_same_in_both_passes(accum, m, device):
    from fairseq_asam.vision.models import PyramidNet, ShakeDrop

    torch.manual_seed(0)
    model = PyramidNet(20, 16, 5).double().to(device)  # 6 bottleneck blocks with ShakeDrop
    draws = {}
    for name, mod in model.named_modules():
        if isinstance(mod, ShakeDrop):
            mod.register_forward_hook(lambda mod, i, o, name=name: draws.setdefault(name, []).append(
                tuple(t.clone() for t in mod.last_draws)))
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64).to(device)
    y = torch.randint(0, 5, (8,)).to(device)
    opt = ASAM(model.named_parameters(), _sgd(model), rho=0.5)
    train_step(model, opt, nn.CrossEntropyLoss(), x, y, m_sharpness=m, accum_steps=accum)
    # Forward order: per shard, its micro-batches' first passes, then the same micro-batches' second passes.
    pieces = (8 // (m or 8)) * max(1, (m or 8) // (8 // accum))  # forwards per pass
    per_shard = max(1, (m or 8) // (8 // accum))
    assert len(draws) == 6
    for name, calls in draws.items():
        assert len(calls) == 2 * pieces, name
        firsts = []
        for s in range(0, 2 * pieces, 2 * per_shard):
            first, second = calls[s : s + per_shard], calls[s + per_shard : s + 2 * per_shard]
            firsts += first
            for a, b in zip(first, second):
                assert all(torch.equal(u, v) for u, v in zip(a, b)), name  # b, alpha, beta replayed
        if pieces > 1:  # different micro-batches/shards draw afresh
            assert not all(torch.equal(u, v) for u, v in zip(firsts[0], firsts[1]))
