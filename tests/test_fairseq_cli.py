"""Real fairseq-train / fairseq-generate / fairseq-interactive / fairseq-hydra-train processes on a tiny corpus.

- ``--asam-rho 1e-12`` (dropout on, update_freq 2, clipping) equals a plain ``--optimizer adam`` run;
- a run stopped after 4 updates and resumed ends with the same weights and Adam state as an uninterrupted
  8-update run (checkpoints loaded with ``weights_only=True``, --eval-bleu metrics included);
- switching asam_adam -> adam without --reset-optimizer stops with fairseq's message; adam -> asam_adam
  with --reset-optimizer trains;
- fairseq-generate and fairseq-interactive load an asam_adam checkpoint;
- the hydra config trains through fairseq-hydra-train; ``+optimizer=asam_adam`` fails as documented;
- a bad flag stops fairseq-train while parsing, naming the flag, before anything is written;
- DDP: 2 CPU processes (gloo, legacy_ddp), stopped and resumed (ranks > 0 load the checkpoint through
  fairseq's broadcast, i.e. torch.load), end where one process with --update-freq 2 ends.

About 2 minutes on two cores::

    .venv/bin/pytest tests/test_fairseq_cli.py
"""

import shutil
import subprocess
import sys

import pytest
import torch
from fairseq_helpers import (
    REPO,
    USER_DIR,
    _env,
    run_fairseq,
    run_fairseq_at_once,
    tiny_data_bin_fixture,
    tiny_train_args,
    train_logs,
)
from workers import free_port  # tests/ is on sys.path under pytest

import fairseq_asam.fairseq_ext  # noqa: F401  (the checkpoint allow-list: torch.load below runs with weights_only=True)

pytestmark = pytest.mark.slow
tiny_data_bin = tiny_data_bin_fixture()

SAM = ["--task", "translation_sam", "--optimizer", "asam_adam"]
TWO_PASS = ["--update-freq", "2", "--clip-norm", "0.5"]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_state(a, b, *, exact: bool):
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        if exact:
            assert torch.equal(a["model"][k], b["model"][k]), k
        else:
            torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-7, msg=k)
    sa, sb = a["last_optimizer_state"]["state"], b["last_optimizer_state"]["state"]
    assert sa.keys() == sb.keys() and len(sa) == len(a["model"]) - 2  # all trained tensors (not the 2 pos. buffers)
    for i in sa:
        for key in ("exp_avg", "exp_avg_sq"):
            if exact:
                assert torch.equal(sa[i][key], sb[i][key]), (i, key)
            else:
                torch.testing.assert_close(sa[i][key], sb[i][key], rtol=1e-4, atol=1e-9)
        assert int(sa[i]["step"]) == int(sb[i]["step"])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fairseq-cli")


@pytest.fixture(scope="module")
def resume_runs(work, tiny_data_bin):
    """asam_adam, update_freq 2, clipping, dropout, --eval-bleu: 8 updates straight, and 4 + resumed to 8."""
    args = [*SAM, *TWO_PASS]
    full = run_fairseq("train", tiny_train_args(tiny_data_bin, work / "full", *args, "--max-update", "8", validate=True))
    run_fairseq("train", tiny_train_args(tiny_data_bin, work / "part", *args, "--max-update", "4", validate=True))
    shutil.copytree(work / "part", work / "part4")  # the 4-update checkpoint, for the optimizer-switch tests
    resumed = run_fairseq("train", tiny_train_args(tiny_data_bin, work / "part", *args, "--max-update", "8", validate=True))
    return dict(full=full, resumed=resumed)


@pytest.fixture(scope="module")
def tiny_rho_runs(work, tiny_data_bin):
    common = [*TWO_PASS, "--adam-eps", "0.01", "--max-update", "6"]
    adam = run_fairseq("train", tiny_train_args(tiny_data_bin, work / "adam", "--task", "translation", "--optimizer", "adam", *common))
    sam = run_fairseq("train", tiny_train_args(tiny_data_bin, work / "rho0", *SAM, "--asam-rho", "1e-12", *common))
    return adam, sam


def test_tiny_rho_equals_plain_adam(work, tiny_rho_runs):
    adam, sam = tiny_rho_runs
    a, b = _load(work / "adam" / "checkpoint_last.pt"), _load(work / "rho0" / "checkpoint_last.pt")
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 6
    _assert_same_state(a, b, exact=False)
    la, lb = train_logs(adam), train_logs(sam)
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]  # the loss at w, update by update
    for r in lb:  # logged next to it: the loss at w + eps (= the loss at w here) and ||eps||
        assert abs(float(r["loss_eps"]) - float(r["loss"])) <= 1e-3
        assert float(r["eps_norm"]) < 1e-9


def test_logs_loss_eps_sharpness_eps_norm(resume_runs):
    logs = train_logs(resume_runs["full"])
    assert len(logs) == 8
    for r in logs:
        assert float(r["loss_eps"]) == pytest.approx(float(r["loss"]) + float(r["sharpness"]), abs=2e-3)
        assert 0 < float(r["eps_norm"]) < 1
    assert sum(float(r["sharpness"]) for r in logs) > 0  # the ascent goes uphill
    epoch = train_logs(resume_runs["full"], "train")[0]
    assert {"train_loss_eps", "train_sharpness", "train_eps_norm"} <= epoch.keys()


def test_resume_equals_uninterrupted(work, resume_runs):
    a, b = _load(work / "full" / "checkpoint_last.pt"), _load(work / "part" / "checkpoint_last.pt")
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 8
    assert a["extra_state"]["train_iterator"] == b["extra_state"]["train_iterator"]
    _assert_same_state(a, b, exact=True)


def test_switch_optimizer_on_resume(work, tiny_data_bin, resume_runs, tiny_rho_runs):
    # asam_adam -> adam, keeping the optimizer state: fairseq refuses and says what to do.
    p = run_fairseq(
        "train",
        tiny_train_args(
            tiny_data_bin, work / "to-adam", "--task", "translation", "--optimizer", "adam",
            "--restore-file", str(work / "part4" / "checkpoint_last.pt"), "--max-update", "6",
        ),
        check=False,
    )  # fmt: skip
    assert p.returncode != 0
    assert "please reset the optimizer (--reset-optimizer)" in p.stderr and "FairseqASAMAdam" in p.stderr
    assert not (work / "to-adam" / "checkpoint_last.pt").exists()
    # adam -> asam_adam with --reset-optimizer: fresh Adam moments, the weights carry on.
    start = _load(work / "adam" / "checkpoint_last.pt")["model"]
    p = run_fairseq(
        "train",
        tiny_train_args(
            tiny_data_bin, work / "to-asam", *SAM, "--restore-file", str(work / "adam" / "checkpoint_last.pt"),
            "--reset-optimizer", "--max-update", "9",
        ),
    )  # fmt: skip
    logs = train_logs(p)
    assert logs and all(float(r["eps_norm"]) > 0 for r in logs)
    end = _load(work / "to-asam" / "checkpoint_last.pt")
    assert end["optimizer_history"][-1]["optimizer_name"] == "FairseqASAMAdam"
    assert any(not torch.equal(start[k], end["model"][k]) for k in start)


def test_generate_and_interactive_load_asam_checkpoint(work, tiny_data_bin, resume_runs):
    ckpt = work / "full" / "checkpoint_last.pt"
    gen = run_fairseq(
        "generate",
        [tiny_data_bin, "--user-dir", USER_DIR, "--path", str(ckpt), "--gen-subset", "test", "--beam", "2",
         "--max-len-b", "12", "--batch-size", "8", "--cpu"],
    )  # fmt: skip
    hyps = [line for line in gen.stdout.splitlines() if line.startswith("H-")]
    assert len(hyps) == 16  # every test sentence
    assert "BLEU4 =" in gen.stdout
    inter = run_fairseq(
        "interactive",
        [tiny_data_bin, "--user-dir", USER_DIR, "--path", str(ckpt), "--source-lang", "de", "--target-lang", "en",
         "--beam", "2", "--cpu"],
        input="s1 s2 s3\ns4 s5 s6 s7\n",
    )  # fmt: skip
    hyps = [line for line in inter.stdout.splitlines() if line.startswith("H-")]
    assert len(hyps) == 2 and all(h.split("\t")[2].strip() for h in hyps)


def test_checkpoint_needs_the_allow_list(work, resume_runs):
    # In a fresh interpreter without the extension, torch >= 2.6 refuses fairseq's checkpoint; with it, loads.
    ckpt = str(work / "full" / "checkpoint_last.pt")
    load = f"import torch; print(torch.serialization.get_unsafe_globals_in_checkpoint({ckpt!r})); torch.load({ckpt!r}, weights_only=True)"
    plain = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, env=_env())
    assert plain.returncode != 0 and "Weights only load failed" in plain.stderr
    # What it holds beyond tensors: the model config (a Namespace) and, from --eval-bleu, numpy arrays.
    assert "argparse.Namespace" in plain.stdout and "numpy.ndarray" in plain.stdout
    # With the extension imported (as here), nothing in it is outside the allow-list.
    assert torch.serialization.get_unsafe_globals_in_checkpoint(ckpt) == []
    ok = subprocess.run([sys.executable, "-c", "import fairseq_asam.fairseq_ext; " + load], capture_output=True, text=True, env=_env())
    assert ok.returncode == 0, ok.stderr[-2000:]


TINY_HYDRA = [
    "model.encoder_embed_dim=16", "model.decoder_embed_dim=16", "model.encoder_ffn_embed_dim=32",
    "model.decoder_ffn_embed_dim=32", "model.encoder_layers=1", "model.decoder_layers=1",
    "model.encoder_attention_heads=2", "model.decoder_attention_heads=2", "dataset.max_tokens=200",
    "common.cpu=true", "common.log_interval=1", "dataset.disable_validation=true", "task.eval_bleu=false",
    "lr_scheduler.warmup_updates=2",
]  # fmt: skip


def test_hydra_config_trains(work, tiny_data_bin):
    p = run_fairseq(
        "hydra_train",
        ["--config-dir", str(REPO / "fairseq_asam" / "config"), "--config-name", "iwslt14_de_en_asam",
         f"task.data={tiny_data_bin}", f"common.user_dir={USER_DIR}", f"checkpoint.save_dir={work / 'hydra'}",
         "optimization.max_update=3", "optimizer.asam_rho=0.3", *TINY_HYDRA],
    )  # fmt: skip
    assert "eps_norm=" in p.stdout and "loss_eps=" in p.stdout
    ckpt = _load(work / "hydra" / "checkpoint_last.pt")
    cfg = ckpt["cfg"]
    assert cfg["task"]["_name"] == "translation_sam"
    assert cfg["optimizer"]["_name"] == "asam_adam"
    assert cfg["optimizer"]["asam_rho"] == 0.3 and cfg["optimizer"]["asam_eta"] == 0.01  # override, YAML
    assert cfg["optimizer"]["adam_betas"] == "(0.9, 0.98)"
    assert ckpt["optimizer_history"][-1]["optimizer_name"] == "FairseqASAMAdam"
    assert ckpt["optimizer_history"][-1]["num_updates"] == 3


def test_hydra_plus_optimizer_does_not_work(work, tiny_data_bin):
    # The documented limitation: the user dir registers asam_adam only after Hydra composed the config.
    p = run_fairseq(
        "hydra_train",
        ["+optimizer=asam_adam", "task._name=translation_sam", f"task.data={tiny_data_bin}", f"common.user_dir={USER_DIR}",
         f"checkpoint.save_dir={work / 'hydra-plus'}", f"hydra.run.dir={work / 'hydra-plus'}"],
        check=False,
    )  # fmt: skip
    assert p.returncode != 0
    assert "Could not find 'optimizer/asam_adam'" in p.stdout + p.stderr


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--asam-rho", "-1", "--asam-rho must be > 0, got -1"),
        ("--asam-p", "3", "--asam-p must be 2 or inf, got 3"),
    ],
)
def test_bad_flag_stops_before_anything_is_written(work, tiny_data_bin, flag, value, message):
    save = work / f"bad{flag}"
    p = run_fairseq("train", tiny_train_args(tiny_data_bin, save, *SAM, flag, value), check=False)
    assert p.returncode == 2  # argparse's exit status
    assert message in p.stderr
    assert not save.exists()


def test_a_task_without_the_second_pass_is_refused_at_startup(work, tiny_data_bin):
    save = work / "plain-task"
    args = [a for a in tiny_train_args(tiny_data_bin, save, *SAM) if a != "translation_sam"]
    args[args.index("--task") + 1:args.index("--task") + 1] = ["translation"]
    p = run_fairseq("train", args, check=False)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == (
        "fairseq-train: error: --optimizer asam_adam needs the two-pass sharpness-aware train step, which --task "
        "translation does not run: use --task translation_sam (or a task wrapped with "
        "fairseq_asam.fairseq_ext.make_sharpness_aware)"
    )
    assert "Traceback" not in p.stderr
    assert not list(save.glob("*.pt"))  # no checkpoint written


# ---- DDP ----------------------------------------------------------------------------------------



def _ddp_train(data_bin, save_dir, *extra, timeout=240):
    """fairseq-train on 2 CPU processes: gloo, legacy_ddp (fairseq's pytorch_ddp wrapper needs CUDA devices)."""
    port = free_port()
    args = tiny_train_args(
        data_bin, save_dir, *extra, "--distributed-world-size", "2", "--distributed-init-method",
        f"tcp://127.0.0.1:{port}", "--distributed-no-spawn", "--ddp-backend", "legacy_ddp",
        "--distributed-backend", "gloo",
    )  # fmt: skip
    procs = run_fairseq_at_once("train", [[*args, "--distributed-rank", str(rank)] for rank in range(2)], timeout=timeout)
    outs = [(p.stdout, p.stderr) for p in procs]
    failed = [f"rank {r} (exit {p.returncode}):\n{err[-3000:]}" for r, (p, (_, err)) in enumerate(zip(procs, outs)) if p.returncode]
    assert not failed, "\n".join(failed)
    return outs


def test_ddp_two_cpu_processes_match_update_freq_2_and_resume(work, tiny_data_bin):
    # Dropout off: each rank seeds its dropout the same way, one process does not. Batches match: rank r
    # takes batches r, r + 2, ...; one process with --update-freq 2 takes them in pairs.
    common = [*SAM, "--clip-norm", "0.5", "--dropout", "0"]
    run_fairseq("train", tiny_train_args(tiny_data_bin, work / "uf2", *common, "--update-freq", "2", "--max-update", "8"))
    _ddp_train(tiny_data_bin, work / "ddp", *common, "--max-update", "4")
    # Resume: rank 0 reads the checkpoint and broadcasts it; rank 1 unpickles it with torch.load.
    outs = _ddp_train(tiny_data_bin, work / "ddp", *common, "--max-update", "8")
    assert "Loaded checkpoint" in outs[0][0] + outs[0][1]
    a, b = _load(work / "uf2" / "checkpoint_last.pt"), _load(work / "ddp" / "checkpoint_last.pt")
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 8
    _assert_same_state(a, b, exact=False)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs: fairseq's pytorch_ddp (nccl) backend")
@pytest.mark.parametrize("backend", ["pytorch_ddp", "legacy_ddp"])
def test_ddp_two_gpus_fp16_matches_update_freq_2(work, tiny_data_bin, backend):
    common = [*SAM, "--clip-norm", "0.5", "--dropout", "0", "--fp16", "--max-update", "6"]

    def gpu(args):
        return [a for a in args if a != "--cpu"]

    run_fairseq("train", gpu(tiny_train_args(tiny_data_bin, work / f"gpu-uf2-{backend}", *common, "--update-freq", "2")))
    p = run_fairseq(
        "train",
        gpu(tiny_train_args(tiny_data_bin, work / f"gpu-ddp-{backend}", *common, "--distributed-world-size", "2",
                            "--ddp-backend", backend)),
    )  # fmt: skip
    assert all(float(r["eps_norm"]) > 0 for r in train_logs(p))
    a = _load(work / f"gpu-uf2-{backend}" / "checkpoint_last.pt")["model"]
    b = _load(work / f"gpu-ddp-{backend}" / "checkpoint_last.pt")["model"]
    for k in a:  # fp16 weights: a few units in the last place apart at most
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=4e-3, atol=1e-3, msg=k)
