"""The efficiency study (issue 19): the rule fixed in advance, the power check, the BatchNorm recompute at w,
and scripts/efficiency_study.py --quick end to end (scikit-learn's digits, 2 tasks, 2 paired seeds, 1 epoch)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studies import efficiency as E  # noqa: E402


def _summary(kept_a, kept_b, powered_b=True, swa=90.0):
    """Two variants; full ASAM gains 2 points over SGD (90 -> 92); 'cheap' keeps kept_* of it."""
    def variant(kept, powered):
        rows = {"sgd": {"acc_mean": 90.0, "gain_kept": 0.0, "passes": 1.0},
                "asam": {"acc_mean": 92.0, "gain_kept": 1.0, "passes": 2.0},
                "sgd+swa": {"acc_mean": swa, "gain_kept": (swa - 90) / 2, "passes": 1.01},
                "sgd+ema": {"acc_mean": 90.5, "gain_kept": 0.25, "passes": 1.01},
                "cheap": {"acc_mean": 90 + 2 * kept, "gain_kept": kept, "passes": 1.0},
                "twice": {"acc_mean": 92.0, "gain_kept": 1.0, "passes": 1.5}}
        return {"power": {"powered": powered, "ratio": 5.0 if powered else 1.0}, "rows": rows}
    return {"a": variant(kept_a, True), "b": variant(kept_b, powered_b)}


def test_rule_keeps_90_percent_everywhere_powered_at_1_1x_and_beats_the_baselines():
    rec = E.recommend(_summary(0.95, 0.92))
    assert rec["recommended"] == "cheap" and rec["verdicts"]["cheap"]["worst_kept"] == pytest.approx(0.92)
    assert not rec["verdicts"]["twice"]["qualifies"] and "costs 1.50x" in rec["verdicts"]["twice"]["breaks"][0]
    rec = E.recommend(_summary(0.95, 0.5))
    assert rec["recommended"] is None and rec["best"] == "cheap"
    assert rec["verdicts"]["cheap"]["breaks"] == ["b: keeps 50% < 90%"]
    # An unpowered variant is left out of the ranking, whatever is kept there.
    rec = E.recommend(_summary(0.95, -3.0, powered_b=False))
    assert rec["recommended"] == "cheap" and rec["not_powered"] == ["b"]
    # Keeping the gain is not enough when SWA at the same cost does better.
    rec = E.recommend(_summary(0.95, 0.95, swa=92.0))
    assert rec["recommended"] is None and "not above sgd+swa" in rec["verdicts"]["cheap"]["breaks"][0]


def test_power_check_is_gain_over_paired_se():
    runs = []
    for seed, (s, a) in enumerate([(90.0, 92.0), (91.0, 92.0), (90.0, 93.0)]):
        for m, acc in (("sgd", s), ("asam", a)):
            runs.append({"task": "t", "method": m, "seed": seed, "noise": 0.4, "acc": {m: {"trained": acc}},
                         "passes": 1.0, "wall_s": 1.0, "epochs": 1, "bn": False})
    p = E.summarize(runs)["t 40% noise"]["power"]
    gains = [2.0, 1.0, 3.0]
    assert p["gain"] == pytest.approx(2.0) and p["paired_std"] == pytest.approx(1.0)
    assert p["se"] == pytest.approx(1 / math.sqrt(3)) and p["ratio"] == pytest.approx(2 * math.sqrt(3))
    assert p["powered"] and sum(gains) / 3 == p["gain"]


def test_recompute_bn_gives_the_batch_statistics_at_the_current_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
    x = torch.randn(1000, 5)
    model[1].running_mean.fill_(7.0)  # stale statistics, as if gathered at other weights
    E.recompute_bn(model, x, batch=250)
    h = model[0](x).detach()
    # update_bn's cumulative average over equal batches: the mean of the batch means and of the batch variances
    means = torch.stack([c.mean(0) for c in h.split(250)])
    vars_ = torch.stack([c.var(0, unbiased=True) for c in h.split(250)])
    torch.testing.assert_close(model[1].running_mean, means.mean(0))
    torch.testing.assert_close(model[1].running_var, vars_.mean(0))
    assert model.training


@pytest.mark.slow
def test_quick_study_writes_power_check_table_json_and_plot(tmp_path, warm_launches):  # warm starts: tests/warm_python.py
    out, plot = tmp_path / "out", tmp_path / "eff.png"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "efficiency_study.py"), "--quick", "--jobs", "2",
                        "--out", str(out), "--plot", str(plot)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[study] power check:" in p.stdout and "gain / SE" in p.stdout
    res = json.loads((out / "results.json").read_text())
    runs = res["runs"]
    assert len(runs) == 2 * 2 * len(E.METHODS)  # tasks x seeds x methods (40% noise only)
    steps = math.ceil(1437 / 64)  # one epoch of the 1437 training digits
    for r in runs:
        assert r["updates"] == steps and r["split"] == "test"
        want = {"sgd": 1.0, "sgd+swa": 1.0, "asam": 2.0, "every10": 1 + math.ceil(steps / 10) / steps,
                "onepass-mom": 1.0, "onepass-prev": 1.0}.get(r["method"])
        if want is not None:
            assert abs(r["passes"] - want) < 1e-12, r
        # BatchNorm runs are read both ways; the MLP has no statistics to recompute.
        assert all(set(a) == ({"trained", "at_w"} if r["task"] == "mnist-cnn" else {"trained"}) for a in r["acc"].values())
    # Validation runs train on 4/5 of the training images and never see the test set.
    # (2 tasks x 2 tuned policies at the one rho of --quick, and SGD per task: the grid's rho -> 0 end)
    assert len(res["val_runs"]) == 2 * 3 and all(r["split"] == "val" and r["updates"] == math.ceil(1150 / 64)
                                                 for r in res["val_runs"])
    sgd_val = {r["task"]: r["acc"]["sgd"]["trained"] for r in res["val_runs"] if r["method"] == "sgd"}
    assert {v: c["sgd_val_acc"] for v, c in ((v, ms["onepass-mom"]) for v, ms in res["chosen"].items())} == {
        f"{t} 40% noise": a for t, a in sgd_val.items()}
    assert set(res["chosen"]) == {"mnist-mlp 40% noise", "mnist-cnn 40% noise"}
    s = res["summary"]["mnist-cnn 40% noise"]["rows"]
    assert s["asam"]["diff_to_asam_mean"] == 0.0 and s["asam"]["n_seeds"] == 2
    assert {"sgd+ema", "sgd+swa", "onepass-mom+ema", "onepass-prev+swa", "onepass-mom [bn at w]"} <= set(s)
    table = (out / "table.md").read_text()
    assert "Power check" in table and "Held-out check" in table
    assert plot.stat().st_size > 10_000
    assert res["heldout"]["runs"] and all(r["noise"] == 0.2 for r in res["heldout"]["runs"])
    # The docs' numbers come from the phases' JSON: summarizing them again trains nothing and gives the same table.
    out2 = tmp_path / "again"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "efficiency_study.py"), "--quick", "--out", str(out2),
                        "--val-from", str(out / "val.json"), "--runs-from", str(out / "runs.json"),
                        "--heldout-from", str(out / "results.json")], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[study] 1/" not in p.stdout and (out2 / "table.md").read_text() == table
    # A wider rho grid from the same files runs only what is new: the grid's new value on validation, then
    # the study runs of any (variant, policy) whose choice moved; every earlier run is reused as it was.
    out3 = tmp_path / "wider"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "efficiency_study.py"), "--quick", "--out", str(out3),
                        "--rho-grid", "1.0,0.5", "--val-from", str(out / "val.json"), "--runs-from",
                        str(out / "runs.json"), "--heldout-from", str(out / "results.json")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[study] 6 of 10 runs reused, 4 to run" in p.stdout  # 2 tasks x 2 policies at the new rho x0.5
    res3 = json.loads((out3 / "results.json").read_text())
    assert res3["rho_grid"] == [1.0, 0.5]

    def key(r):
        return (r["task"], r["method"], r["seed"], r["noise"], r["split"], r["rho_scale"])

    old = {key(r): r for r in res["val_runs"] + runs}
    new_val = [r for r in res3["val_runs"] if key(r) not in old]
    assert sorted(r["rho_scale"] for r in new_val) == [0.5] * 4
    assert all(r == old[key(r)] for r in res3["val_runs"] + res3["runs"] if key(r) in old)
    moved = [r for r in res3["runs"] if key(r) not in old]
    assert all(r["rho_scale"] == 0.5 for r in moved)
    assert len(moved) == 2 * sum(m.name.split("+")[0] == pol for m in E.METHODS for v in res3["chosen"].values()
                                 for pol, c in v.items() if c["rho_scale"] == 0.5)
