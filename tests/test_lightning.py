"""ASAM/SAM in PyTorch Lightning (fairseq_asam.integrations.lightning): each case equals the same updates
computed directly through the core's one sequence (UpdateDriver.finish), weight for weight.

- fp32, bf16-mixed and 16-mixed (Lightning's GradScaler on the CPU), accumulate_grad_batches, gradient
  clipping by norm and by value (of g' only), the cheaper-update policies; dropout replayed, BatchNorm's
  statistics from the first pass only; global_step and hooks count updates; the logged loss is at w;
- ckpt_path= resumes the same run (the policy's state included); a non-finite first pass skips the update
  and backs the scaler off; manual optimization through sharpness_step equals automatic; the wrong loops
  fail loudly.

    .venv/bin/pytest tests/test_lightning.py      # about a minute
"""

import contextlib
import copy

import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning")

pytestmark = pytest.mark.slow  # every test fits a Lightning Trainer (seconds each)

from fairseq_asam import ASAM  # noqa: E402
from fairseq_asam import schedule as sch  # noqa: E402
from fairseq_asam.core import UpdateAdapter  # noqa: E402
from fairseq_asam.integrations.lightning import SharpnessAwareMixin  # noqa: E402
from fairseq_asam.replay import random_state, set_random_state  # noqa: E402

RHO, LR, BATCH = 0.5, 0.1, 8


def _net(dropout=0.3, bn=True):
    torch.manual_seed(0)
    layers = [nn.Linear(5, 16)] + ([nn.BatchNorm1d(16)] if bn else []) + [nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3)]
    return nn.Sequential(*layers)


def _data(n=96):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g), torch.randint(3, (n,), generator=g)


class Net(SharpnessAwareMixin, pl.LightningModule):
    def __init__(self, net, policy=None, manual=False):
        super().__init__()
        self.net = net
        self.policy = policy
        self.calls = 0
        self.hooks = {"on_before_optimizer_step": 0, "on_after_backward": 0}
        self.logged = []
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        self.calls += 1
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        if not self.automatic_optimization:
            raise AssertionError("the manual module overrides training_step")
        return loss

    def log(self, name, value, *a, **kw):
        super().log(name, value, *a, **kw)
        opt = self.sharpness_optimizer
        if opt is None or not opt.driver.replaying:
            self.logged.append(float(value))

    def configure_optimizers(self):
        base = torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)
        return ASAM(self.named_parameters(), base, rho=RHO, schedule=self.policy() if self.policy else None)

    def on_before_optimizer_step(self, optimizer):
        self.hooks["on_before_optimizer_step"] += 1

    def on_after_backward(self):
        self.hooks["on_after_backward"] += 1


class ManualNet(Net):
    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        self.states.append(random_state())

        def closure():
            opt.zero_grad()
            self.calls += 1
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.manual_backward(loss)
            return loss

        return self.sharpness_step(closure)


class _States(pl.Callback):
    """The random state at the start of each update (its first micro-batch), as the reference replays it."""

    def __init__(self, accum):
        self.accum, self.states = accum, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx % self.accum == 0:
            self.states.append(random_state())


def _fit(module, *, steps, accum=1, precision="32-true", clip=None, algo="norm", ckpt=None, epochs=None, **kw):
    x, y = _data()
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    rec = _States(accum)
    if precision == "16-mixed":  # Lightning turns the flag into bf16-mixed on the CPU; the plugin keeps fp16
        from pytorch_lightning.plugins.precision import MixedPrecision

        kw["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
        precision = None
    trainer = pl.Trainer(max_steps=steps if epochs is None else -1, max_epochs=epochs, accumulate_grad_batches=accum,
                         precision=precision, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=clip,
                         gradient_clip_algorithm=algo, callbacks=[rec], **kw)
    trainer.fit(module, dl, ckpt_path=ckpt)
    return trainer, rec


def _direct(net0, states, *, accum, policy=None, clip=None, algo="norm", precision="32-true", gamma=None):
    """The same updates through the core: first pass over the micro-batches at w, finish with an adapter."""
    model = copy.deepcopy(net0)
    model.train()
    opt = ASAM(model.named_parameters(), torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), rho=RHO,
               schedule=policy() if policy else None)
    x, y = _data()
    pieces = list(zip(x.split(BATCH), y.split(BATCH)))
    fp16 = precision == "16-mixed"
    ac = (lambda: torch.autocast("cpu", dtype=torch.float16 if fp16 else torch.bfloat16)) \
        if precision != "32-true" else contextlib.nullcontext
    scaler = torch.amp.GradScaler("cpu") if fp16 else None

    def backward(b):
        with ac():
            loss = nn.functional.cross_entropy(model(b[0]), b[1]) / accum
        (scaler.scale(loss) if scaler else loss).backward()

    class Direct(UpdateAdapter):
        def __init__(self):
            self.model = model

        def rerun(self, b, last):
            backward(b)

        def base_step(self):
            if scaler:
                scaler.unscale_(opt.base_optimizer)
            if clip:
                if algo == "norm":
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                else:
                    torch.nn.utils.clip_grad_value_(model.parameters(), clip)
            if scaler:
                scaler.step(opt.base_optimizer)
                scaler.update()
            else:
                opt.base_optimizer.step()

    for u, state in enumerate(states):
        set_random_state(state)
        opt.zero_grad()
        opt.driver.begin_step()
        for b in pieces[u * accum:(u + 1) * accum]:
            with opt.driver.first_pass(b):
                backward(b)
        opt.driver.finish(Direct(), scale=float(scaler.get_scale()) if scaler else 1.0)
        if gamma is not None:  # a StepLR(step_size=1) stepped once per update
            for g in opt.param_groups:
                g["lr"] *= gamma
    return model, opt


def _same(a, b, tol=0.0):
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        if tol == 0.0:
            assert torch.equal(p, q), n
        else:
            torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=n)


@pytest.mark.parametrize("accum", [1, 3])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_updates_equal_the_core_sequence(accum, precision):
    net0 = _net()
    module = Net(copy.deepcopy(net0))
    trainer, rec = _fit(module, steps=3, accum=accum, precision=precision)
    direct, opt = _direct(net0, rec.states, accum=accum, precision=precision)
    _same(module.net, direct)
    assert trainer.global_step == 3 and module.sharpness_optimizer.schedule.updates == 3
    assert module.calls == 2 * 3 * accum  # both passes over every micro-batch
    assert int(module.net[1].num_batches_tracked) == 3 * accum  # BatchNorm: the first pass only
    assert module.hooks == {"on_before_optimizer_step": 3, "on_after_backward": 3 * accum}
    assert len(module.logged) == 3 * accum  # self.log: the first pass only (the loss at w)


class Existing(pl.LightningModule):
    """A user's module written without the mixin."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return ASAM(self.named_parameters(), torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9), rho=RHO)


class SharpExisting(SharpnessAwareMixin, Existing):
    """The mixin put in front of it, no training_step of its own: the inherited one is recorded."""


def test_mixin_in_front_of_an_existing_module_records_its_training_step():
    net0 = _net()
    module = SharpExisting(copy.deepcopy(net0))
    trainer, rec = _fit(module, steps=3, accum=2)
    direct, _ = _direct(net0, rec.states, accum=2)
    _same(module.net, direct)
    assert module.calls == 2 * 3 * 2 and int(module.net[1].num_batches_tracked) == 3 * 2
    assert not getattr(Existing.training_step, "_sam_recorded", False)  # the user's class is left as it was


class Scheduled(Net):
    def configure_optimizers(self):
        opt = super().configure_optimizers()
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5),
                                                   "interval": "step"}}


def test_lr_scheduler_steps_once_per_update():
    net0 = _net()
    module = Scheduled(copy.deepcopy(net0))
    trainer, rec = _fit(module, steps=3, accum=2)
    direct, opt = _direct(net0, rec.states, accum=2, gamma=0.5)
    _same(module.net, direct)
    shell = module.sharpness_optimizer
    assert trainer.global_step == 3 and shell.param_groups[0]["lr"] == LR * 0.5 ** 3
    assert shell.base_optimizer.param_groups[0]["lr"] == LR * 0.5 ** 3  # one set of groups: the base's


@pytest.mark.parametrize("clip,algo", [(0.05, "norm"), (0.01, "value")])
def test_clipping_acts_on_the_second_pass_gradient_only(clip, algo):
    net0 = _net()
    module = Net(copy.deepcopy(net0))
    _, rec = _fit(module, steps=3, accum=2, clip=clip, algo=algo)
    direct, _ = _direct(net0, rec.states, accum=2, clip=clip, algo=algo)
    _same(module.net, direct)
    unclipped, _ = _direct(net0, rec.states, accum=2)
    assert max(float((a - b).abs().max()) for a, b in zip(direct.parameters(), unclipped.parameters())) > 1e-4


@pytest.mark.parametrize("policy", [lambda: sch.EveryK(2), lambda: sch.OnePass("momentum"),
                                    lambda: sch.LookASAM(2, 0.7)], ids=["every2", "one_pass", "look"])
def test_cheaper_policies(policy):
    net0 = _net()
    module = Net(copy.deepcopy(net0), policy=policy)
    trainer, rec = _fit(module, steps=4, accum=2)
    direct, opt = _direct(net0, rec.states, accum=2, policy=policy)
    _same(module.net, direct)
    s = module.sharpness_optimizer.schedule
    assert (s.updates, s.second_passes) == (opt.schedule.updates, opt.schedule.second_passes) == (4, s.second_passes)
    assert trainer.global_step == 4


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path):
    net0 = _net(dropout=0.0)
    policy = lambda: sch.OnePass("previous")  # noqa: E731  (its stored gradient is state the checkpoint carries)
    whole = Net(copy.deepcopy(net0), policy=policy)
    _fit(whole, steps=None, epochs=2)
    first = Net(copy.deepcopy(net0), policy=policy)
    trainer, _ = _fit(first, steps=None, epochs=1)
    path = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(path)
    resumed = Net(_net(dropout=0.0), policy=policy)
    trainer2, _ = _fit(resumed, steps=None, epochs=2, ckpt=str(path))
    _same(resumed.net, whole.net)
    assert trainer2.global_step == 24 and resumed.sharpness_optimizer.schedule.updates == 24


def test_non_finite_first_pass_skips_and_backs_the_scaler_off():
    class Inf(Net):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if self.trainer.global_step == 1 and not self.sharpness_optimizer.driver.replaying:
                loss = loss * float("inf")
            return loss

    module = Inf(_net())
    trainer, _ = _fit(module, steps=3, precision="16-mixed")
    scaler = trainer.precision_plugin.scaler
    assert scaler.get_scale() == 65536.0 / 2  # one overflow: backed off once
    assert module.sharpness_optimizer.schedule.updates == 2  # the skipped update is not counted
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_manual_optimization_with_sharpness_step_equals_the_core_sequence():
    net0 = _net()
    manual = ManualNet(copy.deepcopy(net0), manual=True)
    manual.states = []
    trainer, _ = _fit(manual, steps=3)
    direct, _ = _direct(net0, manual.states, accum=1)
    _same(manual.net, direct)
    assert trainer.global_step == 3 and manual.calls == 6
    assert int(manual.net[1].num_batches_tracked) == 3 and manual.hooks["on_before_optimizer_step"] == 3


def test_wrong_loops_fail_loudly():
    class Direct(Net):  # manual optimization, stepping the shell itself
        def training_step(self, batch, batch_idx):
            x, y = batch
            opt = self.sharpness_optimizer
            nn.functional.cross_entropy(self.net(x), y).backward()
            opt.ascent_step()
            nn.functional.cross_entropy(self.net(x), y).backward()
            opt.descent_step()

    with pytest.raises(RuntimeError, match=r"call self.sharpness_step\(closure\)"):
        _fit(Direct(_net(), manual=True), steps=2)

    class Stepping(Net):  # manual optimization through LightningOptimizer.step
        def training_step(self, batch, batch_idx):
            x, y = batch
            opt = self.optimizers()

            def closure():
                opt.zero_grad()
                loss = nn.functional.cross_entropy(self.net(x), y)
                self.manual_backward(loss)
                return loss

            opt.step(closure=closure)

    with pytest.raises(RuntimeError, match=r"self.sharpness_step\(closure\)"):
        _fit(Stepping(_net(), manual=True), steps=2)

    class Plain(pl.LightningModule):  # no mixin: Lightning steps the shell itself
        def __init__(self):
            super().__init__()
            self.net = _net()

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return ASAM(self.named_parameters(), torch.optim.SGD(self.parameters(), lr=LR), rho=RHO)

    with pytest.raises(RuntimeError, match="SharpnessAwareMixin first"):
        _fit(Plain(), steps=2)
    with pytest.raises(RuntimeError, match="precision='16-mixed'"):
        _fit(Plain(), steps=2, precision="16-mixed")


_DDP_SCRIPT = r"""
import json, sys, torch, pytorch_lightning as pl
from torch import nn
sys.path.insert(0, sys.argv[1])
import test_lightning as T


class Indexed(T.Net):
    def training_step(self, batch, batch_idx):
        x, y, i = batch
        if not self.sharpness_optimizer.driver.replaying:
            self.seen.append(i.tolist())
        return super().training_step((x, y), batch_idx)


out, world, accum = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
module = Indexed(T._net(dropout=0.0, bn=False))
module.seen = []
x, y = T._data()
ds = torch.utils.data.TensorDataset(x, y, torch.arange(len(x)))
if world > 1:
    dl = torch.utils.data.DataLoader(ds, batch_size=T.BATCH, shuffle=False)
else:  # the union of what the workers saw, batch by batch
    dl = torch.utils.data.DataLoader(ds, batch_sampler=json.load(open(sys.argv[5])))
allreduces = []


def counting_hook(state, bucket):  # DDP's own all-reduce, counted (the tiny model is one bucket)
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    allreduces.append(bucket.index())
    return allreduce_hook(state, bucket)


class CountAllReduces(pl.Callback):
    # Lightning registers a ddp_comm_hook on CUDA only: on the CPU the test puts it on the DDP module itself.
    def on_train_start(self, trainer, module):
        if world > 1:
            trainer.strategy.model.register_comm_hook(None, counting_hook)


trainer = pl.Trainer(max_steps=3, accumulate_grad_batches=accum, accelerator="cpu", devices=world,
                     strategy="ddp" if world > 1 else "auto", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=[CountAllReduces()])
trainer.fit(module, dl)
torch.save({"state": {k: v.clone() for k, v in module.net.state_dict().items()}, "seen": module.seen,
            "allreduces": len(allreduces)}, f"{out}.rank{trainer.global_rank}")
"""


@pytest.mark.parametrize("accum", [1, 2])
def test_ddp_two_workers_equal_one_worker_on_their_union(tmp_path, accum, warm_launches):  # warm: tests/warm_python.py
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_fit.py"
    script.write_text(_DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    here = os.path.dirname(os.path.abspath(__file__))

    def run(world, *extra):
        subprocess.run([sys.executable, str(script), here, str(tmp_path / f"w{world}"), str(world), str(accum), *extra],
                       check=True, env=env, cwd=tmp_path, timeout=600, capture_output=True)

    run(2)
    r0, r1 = (torch.load(tmp_path / f"w2.rank{r}") for r in (0, 1))
    union = [a + b for a, b in zip(r0["seen"], r1["seen"])]
    (tmp_path / "batches.json").write_text(json.dumps(union))
    run(1, str(tmp_path / "batches.json"))
    one = torch.load(tmp_path / "w1.rank0")
    assert one["seen"] == union
    # One all-reduce per pass: the first pass's last micro-batch and the second pass's last (the earlier
    # micro-batches of each pass accumulate locally), so 2 per update whatever the accumulation.
    assert r0["allreduces"] == r1["allreduces"] == 2 * 3
    for k in one["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # the same eps and the same update on every worker
        # g and g' are the workers' average: the update of one worker on their union, to round-off
        torch.testing.assert_close(r0["state"][k], one["state"][k], rtol=1e-5, atol=1e-6, msg=k)
