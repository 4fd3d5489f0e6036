"""The update's one sequence (fairseq_asam.core.update.UpdateDriver.finish) and what it promises every front end.

- ``opt.step(closure)`` and the manual loop that calls ``begin_step()`` replay the first pass's random state in
  the second pass (the same dropout masks), and leave the generator where one pass would have left it;
- ``step(closure, model=m)`` and every front end leave BatchNorm's running statistics as after one pass;
  ``recompute_bn_stats`` gives the statistics of the weights it is called at;
- ``signal_overflow`` makes a GradScaler skip an update and back off as after a real overflow;
- the driver refuses a finish with nothing recorded; one list of groups (the base optimizer's) holds rho/eta/p.

    .venv/bin/pytest tests/test_one_sequence.py      # seconds
"""

import pytest
import torch
from torch import nn

from fairseq_asam import ASAM, SAM, frozen_bn_stats, recompute_bn_stats
from fairseq_asam import schedule as sch
from fairseq_asam.core import UpdateAdapter, UpdateDriver, signal_overflow
from fairseq_asam.vision.step import train_step

STEPS = 5


def _net(dropout=0.3, bn=False):
    torch.manual_seed(0)
    layers = [nn.Linear(5, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3)]
    return nn.Sequential(*layers).double()


def _data(n=12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(3, (n,), generator=g)


def _opt(model, policy=None):
    return ASAM(model.named_parameters(), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.5,
                schedule=policy)


def _closure_run(net, opt, x, y, **step_kw):
    crit = nn.CrossEntropyLoss()
    calls = []

    def closure():
        opt.zero_grad()
        out = crit(net(x), y)
        out.backward()
        calls.append(1)
        return out

    for _ in range(STEPS):
        opt.step(closure, **step_kw)
    return len(calls)


@pytest.mark.parametrize("policy", [None, "every2", "one_pass"])
def test_step_closure_replays_dropout_and_equals_the_vision_step(policy):
    make = {None: lambda: None, "every2": lambda: sch.EveryK(2), "one_pass": lambda: sch.OnePass("momentum")}[policy]
    x, y = _data()
    a, b = _net(), _net()
    oa, ob = _opt(a, make()), _opt(b, make())
    torch.manual_seed(7)
    _closure_run(a, oa, x, y)
    after_a = torch.get_rng_state()
    torch.manual_seed(7)
    for _ in range(STEPS):
        train_step(b, ob, nn.CrossEntropyLoss(), x, y)
    after_b = torch.get_rng_state()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    assert torch.equal(after_a, after_b)  # the generator is where one pass per update leaves it
    assert oa.schedule.second_passes == ob.schedule.second_passes


def test_step_closure_second_call_sees_the_first_calls_masks():
    model = _net(dropout=0.5)
    opt = _opt(model)
    x, _ = _data()
    masks = []

    def closure():
        opt.zero_grad()
        h = model[1](model[0](x))
        m = model[2](torch.ones_like(h))  # the dropout mask this call draws
        masks.append(m.detach().clone())
        out = (model[3](h * m)).square().mean()
        out.backward()
        return out

    torch.manual_seed(3)
    opt.step(closure)
    assert len(masks) == 2 and torch.equal(masks[0], masks[1])
    assert 0.3 < float((masks[0] == 0).double().mean()) < 0.7  # a real mask, not all ones


def test_manual_loop_with_begin_step_replays_dropout():
    x, y = _data()
    crit = nn.CrossEntropyLoss()
    a, b = _net(), _net()
    oa, ob = _opt(a), _opt(b)
    torch.manual_seed(7)
    _closure_run(a, oa, x, y)
    torch.manual_seed(7)
    for _ in range(STEPS):
        ob.zero_grad()
        ob.begin_step()
        crit(b(x), y).backward()
        if ob.scheduled_ascent():
            crit(b(x), y).backward()
        ob.descent_step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


def test_step_closure_with_model_leaves_batchnorm_as_one_pass():
    x, y = _data()
    crit = nn.CrossEntropyLoss()
    frozen, counted, manual = _net(0.0, bn=True), _net(0.0, bn=True), _net(0.0, bn=True)
    _closure_run(frozen, _opt(frozen), x, y, model=frozen)
    _closure_run(counted, _opt(counted), x, y)
    assert int(frozen[1].num_batches_tracked) == STEPS  # one update of the statistics per step
    assert int(counted[1].num_batches_tracked) == 2 * STEPS  # without model=: both passes count, as in torch
    # The same as the manual loop with the public helper around its second pass.
    om = _opt(manual)
    for _ in range(STEPS):
        om.zero_grad()
        om.begin_step()
        crit(manual(x), y).backward()
        if om.scheduled_ascent():
            with frozen_bn_stats(manual):
                crit(manual(x), y).backward()
        om.descent_step()
    for a, b in zip(frozen.state_dict().values(), manual.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert not torch.equal(frozen[1].running_mean, counted[1].running_mean)


def test_frozen_bn_stats_writes_nothing_and_recompute_gives_the_stats_at_w():
    x, _ = _data(32)
    model = _net(0.0, bn=True)
    bn = model[1]
    with frozen_bn_stats(model):
        model(x)
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_mean, torch.zeros(8, dtype=torch.float64))
    assert bn.track_running_stats
    # Statistics gathered elsewhere (another w), then recomputed at this w over the data in two batches:
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(7.0)
    assert recompute_bn_stats(model, [x[:16], x[16:]])
    # A cumulative average over the batches (update_bn's momentum=None): each batch's mean and unbiased variance.
    h1, h2 = model[0](x[:16]).detach(), model[0](x[16:]).detach()
    torch.testing.assert_close(bn.running_mean, (h1.mean(0) + h2.mean(0)) / 2, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(bn.running_var, (h1.var(0) + h2.var(0)) / 2, rtol=1e-12, atol=1e-13)
    assert bn.momentum == 0.1  # put back
    assert model.training
    assert recompute_bn_stats(nn.Linear(2, 2), [torch.zeros(1, 2)]) is False  # no BatchNorm: nothing to do


def test_signal_overflow_makes_a_grad_scaler_skip_and_back_off():
    model = nn.Linear(4, 2)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    w0 = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(torch.randn(3, 4)).sum()).backward()
    signal_overflow(list(model.parameters()))
    assert torch.isinf(model.bias.grad).all()  # the smallest parameter
    scaler.step(base)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w0))
    assert scaler.get_scale() == 512.0  # backed off by its factor, as after a real overflow


class _Recorder(UpdateAdapter):
    def __init__(self, model, base, loss):
        self.model, self.base, self.loss, self.reruns, self.steps = model, base, loss, [], 0

    def rerun(self, item, last):
        self.reruns.append((item, last))
        self.loss(item).backward()

    def base_step(self):
        self.steps += 1
        self.base.step()


def test_finish_replays_every_recorded_micro_batch_once_in_order():
    model = _net(0.0)
    opt = _opt(model)
    drv = opt.driver
    x, y = _data()
    crit = nn.CrossEntropyLoss()
    pieces = [0, 1, 2]

    def loss(i):
        return crit(model(x[4 * i: 4 * i + 4]), y[4 * i: 4 * i + 4]) / 3

    drv.begin_step()
    for i in pieces:
        with drv.first_pass(i):
            loss(i).backward()
    rec = _Recorder(model, opt.base_optimizer, loss)
    result = drv.finish(rec)
    assert rec.reruns == [(0, False), (1, False), (2, True)] and rec.steps == 1
    assert result.second_pass and not result.skipped and drv.recorded == 0
    # the same update as step(closure) on the whole batch (the pieces' losses add up to its mean loss)
    ref = _net(0.0)
    ref_opt = _opt(ref)

    def closure():
        ref_opt.zero_grad()
        out = crit(ref(x), y)
        out.backward()
        return out

    ref_opt.step(closure)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


def test_finish_without_recorded_micro_batches_is_an_error():
    model = _net(0.0)
    opt = _opt(model)
    x, y = _data()
    opt.driver.begin_step()
    nn.functional.cross_entropy(model(x), y).backward()
    w0 = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="inside driver.first_pass"):
        opt.driver.finish(_Recorder(model, opt.base_optimizer, None))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w0))  # nothing moved


def test_non_finite_first_pass_skips_through_the_adapter_and_counts_nothing():
    model = _net(0.0)
    opt = _opt(model)
    x, y = _data()
    w0 = [p.detach().clone() for p in model.parameters()]
    skipped = []

    class Skip(_Recorder):
        def skip(self):
            skipped.append(1)

    opt.driver.begin_step()
    with opt.driver.first_pass(0):
        nn.functional.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("inf")
    rec = Skip(model, opt.base_optimizer, None)
    result = opt.driver.finish(rec)
    assert result.skipped and skipped == [1] and rec.steps == 0 and rec.reruns == []
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w0))
    assert opt.schedule.updates == 0


def test_one_list_of_groups_also_after_load_state_dict():
    model = _net(0.0)
    opt = _opt(model)
    assert opt.param_groups is opt.base_optimizer.param_groups is opt.perturbation.param_groups
    state = opt.state_dict()
    opt.base_optimizer.param_groups[0]["rho"] = 0.25
    opt.load_state_dict(state)  # torch replaces the base's list
    assert opt.param_groups is opt.base_optimizer.param_groups is opt.perturbation.param_groups
    assert opt.perturbation.param_groups[0]["rho"] == 0.5
    opt.rho = 0.3
    assert opt.perturbation.param_groups[0]["rho"] == 0.3 and opt.base_optimizer.param_groups[0]["rho"] == 0.3


def test_add_param_group_is_checked_once_through_the_perturbation():
    model = _net(0.0)
    extra = nn.Linear(2, 2).double()
    opt = _opt(model)
    opt.add_param_group({"params": list(extra.named_parameters()), "rho": 0.1})
    assert opt.base_optimizer.param_groups[-1]["rho"] == 0.1
    assert opt.perturbation.spec(extra.bias).kind == "none"  # named: the bias rule applies
    with pytest.raises(ValueError, match="more than one group"):
        opt.add_param_group({"params": [model[0].weight]})
    with pytest.raises(ValueError, match=r"param_groups\[2\]\['rho'\]"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 2))], "rho": -1.0})
    assert len(opt.base_optimizer.param_groups) == 2


def test_driver_and_policies_share_one_vocabulary():
    for name in ("begin_step", "wants_second_pass", "end_step"):
        assert callable(getattr(sch.Schedule, name))
    for name in ("begin_step", "wants_second_pass", "ascent_step", "end_step", "skip_step", "finish"):
        assert callable(getattr(UpdateDriver, name))
    for name in ("begin_step", "wants_second_pass", "ascent_step", "end_step", "skip_step"):
        assert callable(getattr(ASAM, name)) and callable(getattr(SAM, name))
    for gone in ("expected_passes", "before_descent", "begin"):
        assert not hasattr(sch.Schedule, gone)
