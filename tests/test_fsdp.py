"""SAM/ASAM under FSDP2 (torch.distributed.fsdp.fully_shard) on CPU with gloo: 2 sharded workers equal
1 unsharded process, each shard's eps is the slice of the unsharded eps (a norm of the shard alone would
fail this), one all-reduce per ascent, exact restore, sharded checkpoints that reload on another number of
workers, and ``asam-vision-train --fsdp`` resume == uninterrupted. The 2-process side is tests/fsdp_helpers.py."""

import json
import os
import shutil

import fsdp_helpers as fh  # tests/ is on sys.path under pytest
import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from workers import run_ranks, torchrun  # tests/ is on sys.path under pytest

from fairseq_asam import ASAM, sharpness_cli
from fairseq_asam.vision import fsdp as vfsdp
from fairseq_asam.vision import train as vtrain
from fairseq_asam.vision.toydata import write_cifar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(REPO, "tests", "fsdp_helpers.py")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _torchrun(nproc, *args, cwd):
    """The real torchrun (the docs' command)."""
    p = torchrun(nproc, list(args), cwd=cwd, env=_env())
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p


def _ranks(nproc, *args, cwd):
    """``torchrun --nproc_per_node nproc ARGS`` as its workers see it, forked warm (tests/workers.py)."""
    p = run_ranks(nproc, list(args), cwd=cwd, env=_env())
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """tests/fsdp_helpers.py train on 2 workers (every configuration, the shard check, a checkpoint)."""
    out = tmp_path_factory.mktemp("fsdp")
    _ranks(2, HELPER, "train", str(out), cwd=str(out))
    return str(out)


def _maxdiff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) if a[k].numel() else 0.0 for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(fh.CONFIGS))
def test_two_sharded_workers_equal_one_process(sharded_run, name):
    # Same global batch of 8 (4 per worker), no m-sharpness, no BatchNorm: the first-pass gradient is the
    # global one on both sides, so eps and the update are the same up to float32 summation order.
    # Measured (torch 2.14.1, CPU): max |difference| 3.0e-8 (sgd, sam), 7.5e-9 (asam element), 1.5e-8 (filter).
    got = torch.load(os.path.join(sharded_run, "train-2.pt"), weights_only=True)
    assert got["world"] == 2
    model, _, _, eps = fh.run(fh.CONFIGS[name], sharded=False)
    ref = fh.full_state(model)
    assert _maxdiff(ref, got[name]["weights"]) < 2e-7
    # The logged ||eps|| is the global one (it rides in the same all-reduce as the norm).
    assert got[name]["eps"] == pytest.approx(eps, rel=1e-6)
    # Not vacuous: the weights moved, and the perturbation changed the trajectory.
    init = fh.full_state(fh.build(fh.CONFIGS[name], sharded=False)[0])
    assert _maxdiff(ref, init) > 0.1
    if name != "sgd":
        sgd = fh.full_state(fh.run(fh.CONFIGS["sgd"], sharded=False)[0])
        assert _maxdiff(ref, sgd) > 1e-3
        assert min(eps) > 0


def _chunk(t, rank, world=2):
    parts = torch.chunk(t, world, dim=0)
    return parts[rank] if rank < len(parts) else t[:0]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sam", "asam-element", "asam-filter", "asam-filter-foreach"])
def test_each_shard_perturbation_is_the_slice_of_the_unsharded_one(sharded_run, name):
    model, opt, _ = fh.build(fh.CONFIGS[name], sharded=False)
    fh.first_grads(model)
    one = fh.ascent_eps(model, opt)
    ref = one["eps"]
    assert one["restored"] and not one["computed_is_dtensor"]
    assert _maxdiff(ref, one["computed"]) < 1e-7
    for rank in (0, 1):
        got = torch.load(os.path.join(sharded_run, f"shards-rank{rank}.pt"), weights_only=True)[name]
        # fully_shard splits dim 0 like torch.chunk: 5 filters -> 3 + 2, gate's 1 filter -> 1 + 0 (empty).
        want = {n: _chunk(e, rank) for n, e in ref.items()}
        assert {n: tuple(e.shape) for n, e in got["eps"].items()} == {n: tuple(e.shape) for n, e in want.items()}
        assert _maxdiff(want, got["eps"]) < 1e-7
        # A norm of the local slice (what the popular SAM code computes on a shard) is caught by the same check.
        assert _maxdiff(want, got["naive"]) > 1e-2
        assert got["restored"]  # restore() is bit for bit on the shards
        # compute_eps() gives DTensors placed like the parameters; applied_eps_norm() totals the shards.
        assert got["computed_is_dtensor"] and _maxdiff(want, got["computed"]) < 1e-7
        assert got["applied"] == pytest.approx(one["applied"], rel=1e-6)
        assert got["collectives"] == {"c10d.allreduce_": 1}  # the norm and ||eps||^2: one all-reduce


@pytest.mark.slow
def test_sharded_checkpoint_reloads_on_another_number_of_workers(sharded_run):
    # Saved by 2 workers after 4 ASAM (filter) updates, loaded by 1: weights, momentum and rho/eta/p exact.
    _ranks(1, HELPER, "load", sharded_run, cwd=sharded_run)
    saved = torch.load(os.path.join(sharded_run, "ck-full.pt"), weights_only=True)
    got = torch.load(os.path.join(sharded_run, "loaded-1.pt"), weights_only=True)
    for key in ("weights", "momentum"):
        for n in saved[key]:
            assert torch.equal(saved[key][n], got[key][n]), (key, n)
    assert got["groups"] == saved["groups"] and got["groups"][0]["rho"] == 0.5
    assert got["shares_groups"] and got["epoch"] == fh.STEPS and got["step_ok"]


@pytest.mark.slow
def test_hsdp_two_replicas_of_two_shards_equal_one_process(tmp_path):
    # HSDP (mesh 2 x 2, placements (Replicate(), Shard(0))): the replicas hold the same reduced gradient, so
    # the norm must be totalled over the shard group only; over all 4 workers it would count every shard
    # twice and eps would be sqrt(2) too small. Measured: max |difference| 3.0e-8 (sam), 1.5e-8 (asam filter).
    _ranks(4, HELPER, "hsdp", str(tmp_path), cwd=str(tmp_path))
    got = torch.load(os.path.join(str(tmp_path), "hsdp-4.pt"), weights_only=True)
    for name in ("sam", "asam-filter"):
        assert got[name]["placements"] == "(Replicate(), Shard(dim=0))"
        model, _, _, eps = fh.run(fh.CONFIGS[name], sharded=False)
        assert _maxdiff(fh.full_state(model), got[name]["weights"]) < 2e-7
        assert got[name]["eps"] == pytest.approx(eps, rel=1e-6)


# ---- errors the core raises on DTensors it cannot handle ------------------------------------------


@pytest.fixture
def one_rank_group():
    vfsdp.init_process_group("gloo")
    yield
    dist.destroy_process_group()


def test_filter_wise_needs_dim0_shards(one_rank_group):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (1,))
    w = torch.nn.Parameter(distribute_tensor(torch.randn(4, 2, 3, 3), mesh, [Shard(1)]))
    w.grad = distribute_tensor(torch.randn(4, 2, 3, 3), mesh, [Shard(1)])
    opt = ASAM([("conv.weight", w)], torch.optim.SGD([w], lr=0.1), normalization="filter")
    with pytest.raises(ValueError, match=r"conv.weight: filter-wise normalization needs whole filters"):
        opt.ascent_step()
    # Element-wise is local, so Shard(1) is fine there; a gradient placed unlike its parameter is not.
    w.grad = distribute_tensor(torch.randn(4, 2, 3, 3), mesh, [Replicate()])
    opt = ASAM([("conv.weight", w)], torch.optim.SGD([w], lr=0.1))
    with pytest.raises(RuntimeError, match=r"its gradient is a DTensor \(Replicate\(\),\)"):
        opt.ascent_step()
    w.grad = distribute_tensor(torch.randn(4, 2, 3, 3), mesh, [Shard(1)])
    before = w.to_local().clone()
    assert opt.ascent_step()
    opt.restore()
    assert torch.equal(w.to_local(), before)


def test_placements_the_core_refuses(one_rank_group):
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor, init_device_mesh

    def asam(w, g, **kw):
        w = torch.nn.Parameter(w)
        w.grad = g
        return ASAM([("fc.weight", w)], torch.optim.SGD([w], lr=0.1), **kw)

    mesh = init_device_mesh("cpu", (1,))
    t = torch.randn(4, 3)
    # An unreduced gradient (what a backward without gradient synchronization leaves).
    opt = asam(distribute_tensor(t, mesh, [Shard(0)]), DTensor.from_local(t.clone(), mesh, [Partial()]))
    with pytest.raises(RuntimeError, match=r"fc.weight: the parameter is a DTensor placed \(Shard\(dim=0\),\)"):
        opt.ascent_step()
    opt = asam(DTensor.from_local(t.clone(), mesh, [Partial()]), DTensor.from_local(t.clone(), mesh, [Partial()]))
    with pytest.raises(RuntimeError, match=r"hold a partial \(unreduced\) value"):
        opt.ascent_step()
    # Two sharded mesh dimensions (FSDP + tensor parallel).
    mesh2 = init_device_mesh("cpu", (1, 1))
    opt = asam(distribute_tensor(t, mesh2, [Shard(0), Shard(1)]), distribute_tensor(t, mesh2, [Shard(0), Shard(1)]))
    with pytest.raises(NotImplementedError, match=r"sharded over 2 mesh dimensions"):
        opt.ascent_step()
    # fp16 shards: the fp16 overflow guard scales by 1/norm before the second T, which needs the total first.
    h = t.half()
    opt = asam(distribute_tensor(h, mesh, [Shard(0)]), distribute_tensor(h.clone(), mesh, [Shard(0)]))
    with pytest.raises(ValueError, match=r"fp16 gradients on a sharded model"):
        opt.ascent_step()
    # A plain gradient on a DTensor parameter.
    opt = asam(distribute_tensor(t, mesh, [Shard(0)]), t.clone())
    with pytest.raises(RuntimeError, match=r"its gradient is a plain Tensor"):
        opt.ascent_step()


# ---- asam-vision-train --fsdp ------------------------------------------------------------------------


TINY = ["--model", "resnet8", "--batch-size", "32", "--workers", "0", "--no-progress", "--test-batch-size", "10",
        "--device", "cpu", "--fsdp"]


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    # 101 test images, batches of 10: worker 0 runs 6 forwards (51 images), worker 1 five and one empty batch,
    # without which worker 0 would wait forever in its sixth all-gather.
    write_cifar(str(root), "cifar10", n_train=128, n_test=101, seed=0)
    return str(root)


def _full(ck_dir, tmp):
    f = os.path.join(tmp, os.path.basename(os.path.dirname(ck_dir)) + ".pt")
    dcp_to_torch_save(ck_dir, f)
    return torch.load(f, weights_only=True)


@pytest.mark.slow
def test_cli_fsdp_resume_equals_uninterrupted(cifar_dir, tmp_path, capsys):
    common = ["-m", "fairseq_asam.vision", "--dataset", "cifar10", "--data-dir", cifar_dir, "--epochs", "2",
              "--minimizer", "asam", "--normalization", "filter", *TINY]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _ranks(2, *common, "--run-dir", a, cwd=str(tmp_path))
    _ranks(2, *common, "--run-dir", b, "--stop-after", "1", cwd=str(tmp_path))
    c = str(tmp_path / "c")
    shutil.copytree(b, c)  # for the 1-worker resume below
    p = _ranks(2, *common, "--run-dir", b, "--resume", cwd=str(tmp_path))
    assert "resumed from" in p.stdout
    ca = _full(os.path.join(a, vfsdp.CHECKPOINT), str(tmp_path))
    cb = _full(os.path.join(b, vfsdp.CHECKPOINT), str(tmp_path))
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for k in ca["optimizer"]["state"]:
        assert torch.equal(ca["optimizer"]["state"][k]["momentum_buffer"], cb["optimizer"]["state"][k]["momentum_buffer"]), k
    ma, mb = vfsdp.read_meta(os.path.join(a, vfsdp.CHECKPOINT)), vfsdp.read_meta(os.path.join(b, vfsdp.CHECKPOINT))
    for ra, rb in zip(ma["history"], mb["history"]):
        ra.pop("time_s"), rb.pop("time_s"), ra.pop("images_per_s", None), rb.pop("images_per_s", None)
    assert ma["history"] == mb["history"] and len(ma["history"]) == 2 and ma["asam"]["normalization"] == "filter"
    for h in ma["history"]:  # every one of the 101 test images counted once: top-1 is k / 101
        k = h["test_acc"] * 101 / 100
        assert abs(k - round(k)) < 1e-9, h
    # The weights load without a process group (evaluation, the sharpness tool) and give the logged accuracy.
    model, args = vtrain.load_model_from_checkpoint(os.path.join(a, vfsdp.CHECKPOINT))
    assert args["fsdp"] and args["world_size"] == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, ca["model"][k]), k
    # asam-sharpness reads the folder too; its loss at w is the test loss the 2 sharded workers logged.
    out_json = tmp_path / "sharp.json"
    assert sharpness_cli.cli_main(["vision", os.path.join(a, vfsdp.CHECKPOINT), "--split", "test", "--batch-size",
                                   "50", "--rho", "0.5", "--steps", "1", "--out", str(out_json)]) == 0
    logged = json.load(open(os.path.join(a, "metrics.json")))[-1]["test_loss"]
    assert json.loads(out_json.read_text())["loss"] == pytest.approx(logged, rel=1e-5)
    # Resuming the sharded run without --fsdp says why it finds no checkpoint.
    with pytest.raises(SystemExit):
        vtrain.cli_main([*common[2:-1], "--run-dir", c, "--resume"])
    assert "checkpoint_last.dcp is there: the run was trained with --fsdp" in capsys.readouterr().err
    # The 2-worker checkpoint of epoch 1 resumes on 1 worker (in this process: a one-rank group).
    assert vtrain.cli_main([*common[2:], "--run-dir", c, "--resume"]) == 0
    hist = json.load(open(os.path.join(c, "metrics.json")))
    assert [h["epoch"] for h in hist] == [1, 2] and hist[0] == json.load(open(os.path.join(b, "metrics.json")))[0]
    assert json.load(open(os.path.join(c, "args.json")))["world_size"] == 1


@pytest.mark.parametrize("argv,message", [
    (["--m", "8"], "--fsdp computes eps from the global batch's gradient"),
    (["--amp", "fp16"], "--fsdp with --amp fp16 is not supported"),
])
def test_cli_fsdp_bad_combinations(cifar_dir, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        vtrain.cli_main(["--data-dir", cifar_dir, "--run-dir", str(tmp_path / "r"), *TINY, *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_docs_example_runs_under_torchrun(tmp_path):
    import re

    text = open(os.path.join(REPO, "docs", "distributed.md")).read()
    (code,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    script = tmp_path / "example.py"
    script.write_text(code)
    p = _torchrun(2, str(script), cwd=str(tmp_path))
    eps = [float(v) for v in re.findall(r"step \d: \|\|eps\|\| = ([0-9.]+)", p.stdout)]
    assert len(eps) == 3 and all(0 < e < 1 for e in eps), p.stdout


@pytest.mark.slow
@pytest.mark.parametrize("flags,fractions", [
    (["--one-pass", "previous"], [0.0, 0.0]),
    (["--every", "2"], [0.5, 0.5]),  # 2 updates per epoch (batch 32 of 128 images on 2 workers: 4): refresh on 0, 2
], ids=["one-pass-previous", "every2"])
def test_cli_fsdp_schedules_resume_equals_uninterrupted(cifar_dir, tmp_path, flags, fractions):
    # A schedule runs through the same sharded update (one update path): its stored gradient is a DTensor
    # shard per worker, saved and resumed with the sharded checkpoint.
    common = ["-m", "fairseq_asam.vision", "--dataset", "cifar10", "--data-dir", cifar_dir, "--epochs", "2",
              "--minimizer", "asam", *TINY, *flags]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _ranks(2, *common, "--run-dir", a, cwd=str(tmp_path))
    _ranks(2, *common, "--run-dir", b, "--stop-after", "1", cwd=str(tmp_path))
    _ranks(2, *common, "--run-dir", b, "--resume", cwd=str(tmp_path))
    ca = _full(os.path.join(a, vfsdp.CHECKPOINT), str(tmp_path))
    cb = _full(os.path.join(b, vfsdp.CHECKPOINT), str(tmp_path))
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    ma, mb = vfsdp.read_meta(os.path.join(a, vfsdp.CHECKPOINT)), vfsdp.read_meta(os.path.join(b, vfsdp.CHECKPOINT))
    assert [h["second_pass_frac"] for h in ma["history"]] == fractions
    assert [h["test_acc"] for h in ma["history"]] == [h["test_acc"] for h in mb["history"]]
