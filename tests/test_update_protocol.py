"""The one update protocol (fairseq_asam.core.update): every documented loop and every front end runs
the same update under every policy, checked by equal weights and equal pass counts.

- ``step(closure)``, the loop that asks (``begin_step``/``scheduled_ascent``/``descent_step``) and the
  front-end sequence (``wants_second_pass``/``ascent_step``/``end_step`` + the base step) give the same
  weights and counters under every policy; the paper's loop (``ascent_step``/``descent_step`` on every
  update) is the full update, and a policy that skips second passes refuses it at its first call;
- the vision step (``train_step``) equals ``step(closure)`` under every policy, and with micro-batches
  (``accum_steps``) equals itself without them; dropout draws are replayed in the second pass;
- one registry: every policy option is a flag of asam-vision-train and of fairseq's asam_adam, and
  make_schedule builds each policy from it.

    .venv/bin/pytest tests/test_update_protocol.py      # a few seconds
"""

import pytest
import torch
from torch import nn

from fairseq_asam import ASAM
from fairseq_asam import schedule as sch
from fairseq_asam.core import UpdateDriver
from fairseq_asam.vision.step import train_step

STEPS = 7
POLICIES = {
    "full": lambda: None,
    "every3": lambda: sch.EveryK(3),
    "look2": lambda: sch.LookASAM(2, 0.7),
    "late0.5": lambda: sch.LatePhase(0.5, STEPS),
    "adaptive0": lambda: sch.AdaptiveTrigger(0.0),
    "one_pass-momentum": lambda: sch.OnePass("momentum"),
    "one_pass-previous": lambda: sch.OnePass("previous"),
}


def _net(dropout=0.0):
    torch.manual_seed(0)
    layers = [nn.Linear(5, 8), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(8, 3))
    return nn.Sequential(*layers).double()


def _data(n=12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(3, (n,), generator=g)


def _opt(model, policy):
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return ASAM(model.named_parameters(), base, rho=0.5, schedule=POLICIES[policy]())


def _run(policy, loop, dropout=0.0):
    model = _net(dropout)
    opt = _opt(model, policy)
    x, y = _data()
    crit = nn.CrossEntropyLoss()

    def loss():
        return crit(model(x), y)

    torch.manual_seed(5)
    for _ in range(STEPS):
        if loop == "closure":
            def closure():
                opt.zero_grad()
                out = loss()
                out.backward()
                return out
            opt.step(closure)
        elif loop == "asking":  # docs/python-api.md: the loop that asks the schedule
            opt.zero_grad()
            opt.begin_step()
            loss().backward()
            if opt.scheduled_ascent():
                loss().backward()
            opt.descent_step()
        elif loop == "front-end":  # what the vision step and the Trainer integration run
            opt.zero_grad()
            opt.begin_step()
            loss().backward()
            if opt.wants_second_pass():
                assert opt.ascent_step()
                loss().backward()
            assert opt.end_step()
            opt.base_optimizer.step()
        elif loop == "paper":  # the README's loop: both passes on every update
            loss().backward()
            opt.ascent_step()
            loss().backward()
            opt.descent_step()
        else:  # the vision step
            train_step(model, opt, crit, x, y, accum_steps=int(loop.split("-")[1]))
    return [p.detach().clone() for p in model.parameters()], opt.schedule


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("loop", ["asking", "front-end", "vision-1", "vision-3"])
def test_every_loop_equals_step_closure(policy, loop):
    want, ws = _run(policy, "closure")
    got, gs = _run(policy, loop)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert (gs.updates, gs.second_passes) == (ws.updates, ws.second_passes) == (STEPS, ws.second_passes)
    if policy not in ("full", "one_pass-momentum", "one_pass-previous"):
        assert 0 < ws.second_passes < STEPS  # both kinds of update ran
    elif policy == "full":
        assert ws.second_passes == STEPS


@pytest.mark.parametrize("policy", list(POLICIES))
def test_papers_loop_is_the_full_update_or_refused_at_its_first_call(policy):
    if policy == "full":
        got, s = _run(policy, "paper")
        want, _ = _run(policy, "closure")
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert (s.updates, s.second_passes) == (STEPS, STEPS)
        return
    model = _net()
    opt = _opt(model, policy)
    w0 = [p.detach().clone() for p in model.parameters()]
    x, y = _data()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"if opt.scheduled_ascent\(\)"):
        opt.ascent_step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), w0))  # nothing moved


def test_k1_and_start0_accept_the_papers_loop():
    for policy in (sch.EveryK(1), sch.LatePhase(0.0, STEPS)):
        model = _net()
        opt = ASAM(model.named_parameters(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5, schedule=policy)
        x, y = _data()
        nn.functional.cross_entropy(model(x), y).backward()
        assert opt.ascent_step()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.descent_step()
        assert (policy.updates, policy.second_passes) == (1, 1)


def test_one_pass_without_begin_step_is_an_error():
    model = _net()
    opt = _opt(model, "one_pass-previous")
    x, y = _data()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"call opt.begin_step\(\) before"):
        opt.scheduled_ascent()


@pytest.mark.parametrize("policy", ["full", "every3", "look2", "one_pass-previous"])
def test_vision_step_replays_dropout_in_the_second_pass(policy):
    # With dropout, step(closure) draws new masks in its second pass; the vision step replays the first
    # pass's. The closure below replays them too, so the two must agree to round-off.
    model = _net(dropout=0.3)
    opt = _opt(model, policy)
    x, y = _data()
    ref = _net(dropout=0.3)
    ref_opt = _opt(ref, policy)
    crit = nn.CrossEntropyLoss()
    torch.manual_seed(11)
    for _ in range(STEPS):
        train_step(model, opt, crit, x, y)
    torch.manual_seed(11)
    for _ in range(STEPS):
        def closure(state=torch.get_rng_state(), calls=[]):  # noqa: B006,B008 (one closure per update)
            if calls:
                after = torch.get_rng_state()
                torch.set_rng_state(state)
            ref_opt.zero_grad()
            out = crit(ref(x), y)
            out.backward()
            if calls:
                torch.set_rng_state(after)
            calls.append(1)
            return out
        ref_opt.step(closure)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert opt.schedule.second_passes == ref_opt.schedule.second_passes


def test_non_finite_gradient_skips_the_update_and_counts_nothing():
    model = _net()
    opt = _opt(model, "every3")
    w0 = [p.detach().clone() for p in model.parameters()]
    x, y = _data()
    opt.begin_step()
    nn.functional.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    assert opt.scheduled_ascent() is False and opt.last_grad_finite is False
    opt.descent_step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), w0))
    assert opt.schedule.updates == 0


def test_driver_is_the_shells_protocol():
    model = _net()
    opt = _opt(model, "every3")
    assert isinstance(opt.driver, UpdateDriver) and opt.driver.schedule is opt.schedule
    assert opt.driver.perturbation is opt.perturbation


# ---- one registry -------------------------------------------------------------------------------


def test_every_option_is_a_flag_of_each_front_end():
    from fairseq_asam.vision import train as vtrain

    names = set(sch.options())
    assert names == {"every", "reuse_alpha", "start", "adaptive_c", "one_pass"}
    parser = vtrain.build_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    assert {"--" + n.replace("_", "-") for n in names} <= flags
    fields = {name for name, _, _ in sch.dataclass_fields("asam_")}
    assert fields == {"asam_" + n for n in names}
    for name, _, f in sch.dataclass_fields("asam_"):
        assert f.metadata["help"] == sch.options()[name[len("asam_"):]].help


def test_make_schedule_is_generated_from_the_policies():
    built = {
        "every": sch.make_schedule(every=4),
        "look": sch.make_schedule(every=4, reuse_alpha=0.5),
        "late": sch.make_schedule(start=0.5, total_updates=10),
        "adaptive": sch.make_schedule(adaptive_c=0.5),
        "one_pass": sch.make_schedule(one_pass="momentum"),
        "full": sch.make_schedule(),
    }
    assert {k: type(v) for k, v in built.items()} == {k: sch.POLICIES[k] for k in built}
    assert set(built) == set(sch.POLICIES)
    with pytest.raises(TypeError, match="unknown options"):
        sch.make_schedule(sideways=1)


def test_check_mode_states_each_refusal():
    sch.EveryK(2).check_mode(sharded="--fsdp")
    sch.OnePass("momentum").check_mode(sharded="--fsdp")
    sch.Full().check_mode(sharded="--fsdp", per_shard_eps="--m")
    with pytest.raises(ValueError, match="--m \\(m-sharpness\\) with EveryK"):
        sch.EveryK(2).check_mode(per_shard_eps="--m")
    with pytest.raises(ValueError, match="--fsdp with LookASAM"):
        sch.LookASAM(2, 0.7).check_mode(sharded="--fsdp")
