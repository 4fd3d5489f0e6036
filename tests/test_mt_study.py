"""The translation study (issue 19, items 6 and 4): checkpoint averaging as fairseq's average_checkpoints.py,
the paired power check, the rho choice on validation, and studies/mt_convergence.py end to end at a toy size
(real fairseq-train with early stopping and fairseq-generate on a corpus of 80 generated pairs, at most 8
epochs of 2 updates per run)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import warm_python

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studies import mt_convergence as M  # noqa: E402


def test_average_checkpoints_is_the_fp32_mean_of_the_models_and_keeps_the_first_files_other_state(tmp_path):
    g = torch.Generator().manual_seed(0)
    paths, models = [], []
    for i in range(3):
        model = {"w": torch.randn(4, 3, generator=g, dtype=torch.float64), "h": torch.randn(5, generator=g).half(),
                 "n": torch.tensor([i + 1])}
        models.append(model)
        paths.append(tmp_path / f"c{i}.pt")
        torch.save({"model": model, "extra_state": {"i": i}}, paths[-1])
    avg = M.average_checkpoints(paths)
    assert avg["extra_state"] == {"i": 0}
    assert torch.equal(avg["model"]["w"], (models[0]["w"] + models[1]["w"] + models[2]["w"]) / 3)
    assert avg["model"]["h"].dtype == torch.float32
    assert torch.equal(avg["model"]["h"], (models[0]["h"].float() + models[1]["h"].float() + models[2]["h"].float()) / 3)
    assert torch.equal(avg["model"]["n"], torch.tensor([2]))  # integer buffers: floor division, as div_ does
    torch.save({"model": {"other": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(KeyError, match="differ"):
        M.average_checkpoints([paths[0], tmp_path / "bad.pt"])


def test_epoch_checkpoints_are_the_last_n_by_epoch(tmp_path):
    for name in ("checkpoint5.pt", "checkpoint15.pt", "checkpoint10.pt", "checkpoint_last.pt", "checkpoint_best.pt",
                 "checkpoint_avg.pt", "checkpoint_3_300.pt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in M.epoch_checkpoints(tmp_path, 2)] == ["checkpoint15.pt", "checkpoint10.pt"]
    # --checkpoint-upper-bound: the n newest at or below the best epoch
    assert [p.name for p in M.epoch_checkpoints(tmp_path, 2, upper=10)] == ["checkpoint10.pt", "checkpoint5.pt"]
    assert [p.name for p in M.epoch_checkpoints(tmp_path, 1, upper=14)] == ["checkpoint10.pt"]
    with pytest.raises(ValueError, match="3 epoch checkpoints, need 4"):
        M.epoch_checkpoints(tmp_path, 4)
    with pytest.raises(ValueError, match="1 epoch checkpoints, need 2"):
        M.epoch_checkpoints(tmp_path, 2, upper=9)


def test_paired_gain_in_standard_errors():
    p = M.paired({1: 50.0, 2: 52.0, 3: 51.0, 4: 9.0}, {1: 52.0, 2: 53.0, 3: 54.0})
    assert p["seeds"] == [1, 2, 3] and p["diffs"] == [2.0, 1.0, 3.0]
    assert p["gain"] == pytest.approx(2.0) and p["paired_std"] == pytest.approx(1.0)
    assert p["se"] == pytest.approx(1 / math.sqrt(3)) and p["ratio"] == pytest.approx(2 * math.sqrt(3))
    assert p["powered"]
    assert not M.paired({1: 0.0, 2: 0.0}, {1: 1.0, 2: 0.0})["powered"]  # 0.5 / 0.5 = 1 SE


def _rec(method, rho, seed, valid, test=0.0):
    scores = {"valid": {"bleu_tokenized": valid, "bleu_detok": valid},
              "test": {"bleu_tokenized": test, "bleu_detok": test}}
    curve = [{"epoch": e, "loss": {10 * seed - 2: 2.0, 10 * seed: 2.0}.get(e, 3.0)} for e in range(1, 10 * seed + 6)]
    return {"method": method, "rho": rho, "seed": seed, "best": scores, "avg": scores, "early_stopped": True,
            "best_epoch": 10 * seed, "stop_epoch": 10 * seed + 5, "valid_curve": curve, "train_wall_s": 6.0}


def test_rho_is_chosen_by_mean_validation_bleu_over_the_grid_seeds_never_test():
    runs = [_rec("asam", 0.1, 1, 30.0, test=99.0), _rec("asam", 0.1, 2, 20.0, test=99.0),
            _rec("asam", 0.5, 1, 26.0), _rec("asam", 0.5, 2, 26.0),
            _rec("asam", 0.2, 1, 40.0)]  # rho 0.2 lacks seed 2: not a candidate
    rho, means = M.choose_rho(runs, "asam", "best", [1, 2])
    assert rho == 0.5 and means == {0.1: 25.0, 0.5: 26.0}
    assert M.choose_rho(runs, "asam", "best", [1])[0] == 0.2
    with pytest.raises(ValueError, match="no onepass runs"):
        M.choose_rho(runs, "onepass", "best", [1])


def test_plateau_compares_the_mean_loss_after_the_first_best_with_the_mean_before():
    curve = [{"epoch": e, "loss": loss} for e, loss in ((1, 4.0), (2, 2.2), (3, 2.0), (4, 2.1), (5, 2.0), (6, 2.3))]
    # first best: epoch 3; window 2: epochs 1-2 (mean 3.1) against 4-5 (mean 2.05)
    assert M.plateau({"valid_curve": curve}, 2) == round(100 * (2.05 / 3.1 - 1), 2)
    assert M.plateau({"valid_curve": curve[:3]}, 2) is None  # nothing after the best


def test_summary_flags_a_rho_at_the_edge_of_its_grid_and_reads_the_other_seeds_at_the_choice():
    runs = [_rec("adam", None, k, 30.0, test=30.0 + k) for k in (1, 2, 3)]
    for k in (1, 2):
        runs += [_rec("asam", 0.05, k, 31.0), _rec("asam", 0.1, k, 32.0), _rec("asam", 0.2, k, 33.0),
                 _rec("onepass", 0.05, k, 31.0), _rec("onepass", 0.1, k, 33.0), _rec("onepass", 0.2, k, 32.0)]
    runs += [_rec("asam", 0.2, 3, 0.0, test=40.0), _rec("onepass", 0.1, 3, 0.0, test=40.0)]
    s = M.summarize(runs, [1, 2])
    assert s["chosen_rho"] == {"asam": 0.2, "onepass": 0.1}
    assert s["rho_at_grid_edge"] == {"asam": "highest", "onepass": None}
    assert s["rows"]["asam"]["seeds"] == [1, 2, 3] and s["rows"]["asam+avg"]["rho"] == 0.2
    assert s["rows"]["onepass"]["test_bleu_tokenized"] == {1: 0.0, 2: 0.0, 3: 40.0}
    # a tie at the lowest loss: patience counts from the first (epoch 10 * seed - 2), checkpoint_best.pt is the last
    assert s["convergence"] == {"runs": 17, "early_stopped": 17, "best_epoch": [10, 30], "first_best_epoch": [8, 28],
                                "stop_epoch": [15, 35], "epochs_after_first_best": [7, 7], "train_min_total": 1.7,
                                "loss_after_vs_before_best_pct": [-4.76, -4.76]}  # 20 / 7 against 3.0
    assert "(the highest value of the grid)" in M.markdown(s)


@pytest.mark.slow
def test_toy_study_end_to_end(tmp_path, warm_launches):
    # the study, its fairseq-train runs and the one below start warm (tests/warm_python.py), in a bare environment
    out, js = tmp_path / "out", tmp_path / "mt.json"
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    p = subprocess.run([warm_python.warm_executable(env), "-m", "studies.mt_convergence", "--out", str(out), "--json", str(js),
                        "--train-pairs", "80", "--test-pairs", "3", "--noise", "0.25", "--seeds", "1,2",
                        "--grid-seeds", "1", "--rho-grid", "0.3", "--max-epoch", "4", "--patience", "1",
                        "--avg", "2", "--jobs", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-3000:]
    res = json.loads(js.read_text())
    assert res["data"]["valid_pairs"] == 6 and res["data"]["test_pairs"] == 9 and res["data"]["swapped"] == 20
    s = res["summary"]
    assert set(s["rows"]) == {"adam", "adam+avg", "asam", "asam+avg", "onepass", "onepass+avg"}
    assert s["chosen_rho"] == {"asam": 0.3, "onepass": 0.3} and set(s["rho_grid_valid_bleu"]["asam"]) == {"0.3"}
    runs = res["runs"]
    # adam on both seeds, the grid on seed 1, then seed 2 at the chosen rho
    assert sorted((r["method"], r["seed"]) for r in runs) == [(m, k) for m in ("adam", "asam", "onepass") for k in (1, 2)]
    for r in runs:
        curve = r["valid_curve"]
        # a validation and an epoch checkpoint every epoch; fairseq stops one validation after the best
        # (--patience 1), or at --max-epoch
        assert [c["epoch"] for c in curve] == list(range(1, r["stop_epoch"] + 1)) and curve[-1]["update"] == r["updates"]
        losses = [c["loss"] for c in curve]
        # checkpoint_best.pt: the last epoch at the lowest (logged) loss; patience counts from the first
        assert r["best_valid_loss"] == min(losses) and r["best_epoch"] == len(losses) - losses[::-1].index(min(losses))
        assert r["early_stopped"] == (r["stop_epoch"] < 4)
        if r["early_stopped"]:
            assert r["stop_epoch"] == M.first_best_epoch(r) + 1 and losses[-1] >= min(losses)
        assert r["train_wall_s"] > 0
        # "+avg": the two epoch checkpoints up to the best
        assert r["averaged"] == [f"checkpoint{e}.pt" for e in (r["best_epoch"], r["best_epoch"] - 1) if e >= 1]
        assert r["second_pass_frac"] == {"adam": None, "asam": 1.0, "onepass": 0.0}[r["method"]]
    assert s["convergence"]["early_stopped"] == sum(r["early_stopped"] for r in runs)
    # the averaged checkpoint on disk is the mean of the two it names, and checkpoint_best.pt is the best epoch's
    from fairseq_asam.fairseq_ext.checkpoint import allow_fairseq_checkpoints

    allow_fairseq_checkpoints()
    rec = next(r for r in runs if r["method"] == "adam" and len(r["averaged"]) == 2)
    run = Path(rec["dir"]) / "checkpoints"
    a, b, avg, best = (torch.load(run / n, map_location="cpu")["model"] for n in
                       (*rec["averaged"], "checkpoint_avg.pt", "checkpoint_best.pt"))
    for k in avg:
        assert torch.equal(avg[k], (a[k].float() + b[k].float()) / 2) if a[k].is_floating_point() else True
        assert torch.equal(best[k], a[k])
    # the power check is the asam row's paired gain over adam on test (best checkpoints), recomputed here
    adam = {r["seed"]: r["best"]["test"]["bleu_tokenized"] for r in runs if r["method"] == "adam"}
    rho = s["chosen_rho"]["asam"]
    asam = {r["seed"]: r["best"]["test"]["bleu_tokenized"] for r in runs if r["method"] == "asam" and r["rho"] == rho}
    d = [asam[k] - adam[k] for k in (1, 2)]
    sd = abs(d[0] - d[1]) / math.sqrt(2)
    assert s["power"]["gain"] == pytest.approx(sum(d) / 2) and s["power"]["paired_std"] == pytest.approx(sd)
    assert s["power"]["se"] == pytest.approx(sd / math.sqrt(2))
    assert "Power check: full ASAM - Adam" in p.stdout and "| onepass+avg |" in p.stdout
    assert "runs stopped early" in p.stdout
    # a run that cannot improve (lr 0: the validation loss of epoch 1 every epoch) stops after --patience
    # validations; checkpoint_best.pt is the last of the equal ones (fairseq's save_checkpoint keeps a tie)
    r = M.train_one(out, "asam", 0.3, 9, max_epoch=6, patience=2, validate_interval=1, dropout=0.1, avg_n=2,
                    extra=["--lr", "0"])
    assert r["early_stopped"] and r["stop_epoch"] == 3 and r["best_epoch"] == 3 and M.first_best_epoch(r) == 1
    assert len({c["loss"] for c in r["valid_curve"]}) == 1
    assert r["averaged"] == ["checkpoint3.pt", "checkpoint2.pt"]
