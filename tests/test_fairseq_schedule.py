"""The cheaper-update schedules inside fairseq (``--asam-every``, ``--asam-reuse-alpha``, ``--asam-start``,
``--asam-adaptive-c``, ``--asam-one-pass``), with --update-freq 2 and clipping, checked by numbers:

- a schedule that never triggers (``--asam-start 1``) equals plain Adam bit for bit (fp32, --fp16,
  --memory-efficient-fp16, --amp on CPU); ``--asam-every 1`` equals the default update bit for bit;
- Look-ASAM's stored direction is a unit vector orthogonal to the refresh update's g, and the log says
  which updates ran the second pass (``second_pass``) and the fraction so far (``second_pass_frac``);
- stopped and resumed == uninterrupted, bit for bit (weights, Adam state, schedule state), real CLI runs;
- bad flags stop the run with the flag's name in the message.

    .venv/bin/pytest tests/test_fairseq_schedule.py       # about a minute on two cores
"""

import math

import pytest
import torch
from fairseq_helpers import run_fairseq, tiny_data_bin_fixture, tiny_train_args, train_batches, train_logs
from test_fairseq_update import _build, _snapshot, _train

from fairseq_asam.fairseq_ext.optimizer import find_sharpness_optimizer
from fairseq_asam.fairseq_ext.scheduled import descent_grads
from fairseq_asam.fairseq_ext.task import FairseqUpdate, TranslationSAMTask

tiny_data_bin = tiny_data_bin_fixture()

SAM = ["--task", "translation_sam", "--optimizer", "asam_adam", "--asam-rho", "0.5"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16", "memory-efficient-fp16", "amp"])
def test_never_triggering_equals_plain_adam(tiny_data_bin, tmp_path, precision):
    plain, task, cfg = _build(tmp_path / "a", tiny_data_bin, "cpu", precision, "--task", "translation",
                              "--optimizer", "adam", "--max-update", "3")
    never, _, _ = _build(tmp_path / "b", tiny_data_bin, "cpu", precision, *SAM, "--asam-start", "1",
                         "--max-update", "3")
    batches = train_batches(task, cfg, 6)
    before = _snapshot(plain.model)
    a, b = _train(plain, batches), _train(never, batches)
    assert any(not torch.equal(a[n], before[n]) for n in a), "the runs did not train"
    assert all(torch.equal(a[n], b[n]) for n in a)
    s = find_sharpness_optimizer(never.optimizer).schedule
    assert (s.updates, s.second_passes) == (3, 0)


@pytest.mark.slow
def test_every_1_equals_the_default_update(tiny_data_bin, tmp_path):
    full, task, cfg = _build(tmp_path / "a", tiny_data_bin, "cpu", "fp32", *SAM)
    every1, _, _ = _build(tmp_path / "b", tiny_data_bin, "cpu", "fp32", *SAM, "--asam-every", "1")
    batches = train_batches(task, cfg, 6)
    a, b = _train(full, batches), _train(every1, batches)
    assert all(torch.equal(a[n], b[n]) for n in a)


class _RecordGUpdate(FairseqUpdate):
    def before_ascent(self):
        self.task.g = [None if t is None else t.detach().clone() for t in descent_grads(self.optimizer, self.model)]
        super().before_ascent()


class _RecordG(TranslationSAMTask):
    """Keeps the final first-pass gradient g of each update that runs the ascent."""

    update_adapter = _RecordGUpdate


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_look_direction_is_unit_and_orthogonal_to_g(tiny_data_bin, tmp_path, precision):
    trainer, task, cfg = _build(tmp_path, tiny_data_bin, "cpu", precision, *SAM, "--asam-every", "2",
                                "--asam-reuse-alpha", "0.7", task_cls=_RecordG)
    batches = train_batches(task, cfg, 6)
    trainer.train_step(batches[0:2])  # update 0: a refresh
    s = find_sharpness_optimizer(trainer.optimizer).schedule
    d = [t.double() for t in s.direction if t is not None]
    g = [t.double() for t in task.g if t is not None]
    norm = math.sqrt(sum(float(t.square().sum()) for t in d))
    cos = sum(float((a * b).sum()) for a, b in zip(d, g)) / math.sqrt(sum(float(t.square().sum()) for t in g))
    assert norm == pytest.approx(1.0, abs=1e-6)
    assert abs(cos) < 1e-4
    trainer.train_step(batches[2:4])  # update 1: reuse, no second pass
    trainer.train_step(batches[4:6])  # update 2: refresh
    assert (s.updates, s.second_passes, s.last_second_pass) == (3, 2, True)


# ---- real CLI runs: logging, resume == uninterrupted --------------------------------------------------

COMMON = ["--update-freq", "2", "--clip-norm", "0.5"]
RESUME_CASES = {
    "look": ["--asam-every", "2", "--asam-reuse-alpha", "0.7"],
    "one-pass-previous": ["--asam-one-pass", "previous"],
    "one-pass-momentum": ["--asam-one-pass", "momentum"],
    # fp32 only: fairseq saves an --fp16 model in fp16 and rebuilds the fp32 master weights from it on
    # resume, so no --fp16 run resumes bit for bit, with or without a schedule.
    "adaptive": ["--asam-adaptive-c", "0"],
    "late": ["--asam-start", "0.5"],
}


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_equals_uninterrupted(tiny_data_bin, tmp_path, case):
    flags = [*SAM, *COMMON, *RESUME_CASES[case]]
    full = run_fairseq("train", tiny_train_args(tiny_data_bin, tmp_path / "full", *flags, "--max-update", "6"))
    logs = train_logs(full)
    assert len(logs) == 6
    flags_logged = [float(r["second_pass"]) for r in logs]
    if case == "late":
        # The switch is a fraction of --max-update, so a run resumed with another --max-update switches
        # elsewhere: only the uninterrupted run is checked (the counters resume as in the other cases).
        assert flags_logged == [0, 0, 0, 1, 1, 1]
        return
    run_fairseq("train", tiny_train_args(tiny_data_bin, tmp_path / "part", *flags, "--max-update", "3"))
    run_fairseq("train", tiny_train_args(tiny_data_bin, tmp_path / "part", *flags, "--max-update", "6"))
    a, b = _load(tmp_path / "full" / "checkpoint_last.pt"), _load(tmp_path / "part" / "checkpoint_last.pt")
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 6
    for n in a["model"]:
        assert torch.equal(a["model"][n], b["model"][n]), n
    sa, sb = a["last_optimizer_state"], b["last_optimizer_state"]
    for i in sa["state"]:
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa["state"][i][k], sb["state"][i][k]), (i, k)
    qa, qb = sa["asam_schedule"], sb["asam_schedule"]
    assert qa["updates"] == qb["updates"] == 6
    assert qa["second_passes"] == qb["second_passes"]
    for key in ("direction", "previous"):
        if qa.get(key) is not None:
            assert all(torch.equal(x, y) for x, y in zip(qa[key], qb[key]) if x is not None)
    for key in ("mean", "var"):
        if key in qa:
            assert qa[key] == qb[key]
    if case == "look":
        assert flags_logged == [1, 0, 1, 0, 1, 0]
        assert [float(r["second_pass_frac"]) for r in logs] == pytest.approx([1, 0.5, 2 / 3, 0.5, 0.6, 0.5], abs=1e-3)
    elif case.startswith("one-pass"):
        assert flags_logged == [0] * 6
    assert qa["second_passes"] == sum(flags_logged)


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags,message",
    [
        (["--asam-every", "0"], "--asam-every must be >= 1, got 0"),
        (["--asam-reuse-alpha", "-1", "--asam-every", "2"], "--asam-reuse-alpha must be >= 0, got -1"),
        (["--asam-start", "1.5"], "--asam-start must be in [0, 1], got 1.5"),
        (["--asam-adaptive-c", "inf"], "--asam-adaptive-c must be a finite number, got inf"),
    ],
)
def test_bad_flag_stops_before_anything_is_written(tiny_data_bin, tmp_path, flags, message):
    save = tmp_path / "bad"
    p = run_fairseq("train", tiny_train_args(tiny_data_bin, save, *SAM, *flags), check=False)
    assert p.returncode == 2  # argparse's exit status
    assert message in p.stderr
    assert not save.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags,message",
    [
        (["--asam-every", "2", "--asam-start", "0.5", "--max-update", "4"],
         "choose one cheaper-update policy, got --asam-every and --asam-start"),
        (["--asam-reuse-alpha", "0.7"], "--asam-reuse-alpha (Look-ASAM) needs --asam-every k >= 2, got 1"),
        (["--asam-start", "0.5"], "--asam-start needs the run's length: set --max-update"),
    ],
)
def test_inconsistent_flags_are_clear_errors(tiny_data_bin, tmp_path, flags, message):
    p = run_fairseq("train", tiny_train_args(tiny_data_bin, tmp_path / "bad", *SAM, *flags), check=False)
    assert p.returncode != 0
    assert message in p.stderr


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_update_freq_2_and_resume(tiny_data_bin, tmp_path):
    # Look-ASAM on 2 gloo processes (stopped after 4 updates, resumed to 6) equals one process with
    # --update-freq 2: the schedule reads the all-reduced gradient, so both ranks decide and store alike.
    from test_fairseq_cli import _assert_same_state, _ddp_train

    common = [*SAM, "--clip-norm", "0.5", "--dropout", "0", "--asam-every", "2", "--asam-reuse-alpha", "0.7"]
    run_fairseq("train", tiny_train_args(tiny_data_bin, tmp_path / "uf2", *common, "--update-freq", "2",
                                         "--max-update", "6"))
    _ddp_train(tiny_data_bin, tmp_path / "ddp", *common, "--max-update", "4")
    _ddp_train(tiny_data_bin, tmp_path / "ddp", *common, "--max-update", "6")
    a, b = _load(tmp_path / "uf2" / "checkpoint_last.pt"), _load(tmp_path / "ddp" / "checkpoint_last.pt")
    _assert_same_state(a, b, exact=False)
    qa, qb = a["last_optimizer_state"]["asam_schedule"], b["last_optimizer_state"]["asam_schedule"]
    assert (qa["updates"], qa["second_passes"]) == (qb["updates"], qb["second_passes"]) == (6, 3)
    for x, y in zip(qa["direction"], qb["direction"]):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-5)
