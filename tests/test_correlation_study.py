"""The correlation study (paper Table 1 / Figure 2): statistics against hand computations, --quick end to end."""

import itertools
import json
import math

import pytest

from scripts import correlation_study as cs


def tau_b(x, y):
    """Kendall's tau-b by counting pairs (Kendall 1945), independent of scipy."""
    conc = disc = tx = ty = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            tx += 1
        elif dy == 0:
            ty += 1
        elif dx * dy > 0:
            conc += 1
        else:
            disc += 1
    return (conc - disc) / math.sqrt((conc + disc + tx) * (conc + disc + ty))


def test_kendall_tau_matches_pair_counting():
    x = [0.1, 0.4, 0.4, 0.2, 0.9, 0.3, 0.3]
    y = [1.0, 3.0, 2.0, 2.0, 5.0, 0.5, 4.0]
    assert cs.kendall_tau(x, y) == pytest.approx(tau_b(x, y), abs=1e-12)
    assert cs.kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def _records():
    # 2 x 2 x 2 x 2 grid; gap = a known function of the hyper-parameters; measure chosen per test.
    recs = []
    for b, lr, wd, dr in itertools.product([16, 64], [0.01, 0.1], [0.0, 1e-3], [0.0, 0.3]):
        recs.append(dict(batch_size=b, lr=lr, weight_decay=wd, dropout=dr, gap=b / 16 + lr * 10 + dr * 2 - wd * 100))
    return recs


def test_granulated_coefficients_by_hand():
    recs = _records()
    for r in recs:
        # Agrees with the gap on batch size and dropout, disagrees on weight decay, ignores the lr.
        r["m"] = r["batch_size"] / 16 + r["dropout"] * 2 + r["weight_decay"] * 100
    assert cs.granulated(recs, "m", "batch_size") == 1.0
    assert cs.granulated(recs, "m", "dropout") == 1.0
    assert cs.granulated(recs, "m", "weight_decay") == -1.0
    # Varying only the lr leaves m constant: tau undefined in every group, so no coefficient.
    assert math.isnan(cs.granulated(recs, "m", "lr"))
    for r in recs:
        r.update(sharp_p2=r["m"], asharp_p2=r["gap"], sharp_pinf=-r["gap"], asharp_pinf=r["m"])
    stats = cs.rank_statistics(recs)
    assert stats["asharp_p2"]["tau"] == 1.0 and stats["sharp_pinf"]["tau"] == -1.0
    assert stats["asharp_p2"]["Psi"] == 1.0 and stats["sharp_pinf"]["Psi"] == -1.0
    assert stats["sharp_p2"]["Psi"] == pytest.approx(1 / 3)  # mean of 1, 1, -1 (the lr has none)
    assert stats["sharp_p2"]["tau"] == pytest.approx(tau_b([r["m"] for r in recs], [r["gap"] for r in recs]))
    table = cs.table_markdown(stats, 16, 16)
    assert "| Psi (avg.) | 0.333 | 1.000 | -1.000 | 0.333 |" in table
    assert "| learning rate | n/a | 1.000 | -1.000 | n/a |" in table


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path, capsys):
    out = tmp_path / "study"
    assert cs.main(["--quick", "--out-dir", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    table = (out / "table.md").read_text()
    assert table in printed
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == [
        "| tau (rank corr.)", "| mini-batch size", "| learning rate", "| weight decay", "| dropout rate", "| Psi (avg.)",
    ]  # fmt: skip
    png = (out / "scatter.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20000
    res = json.loads((out / "results.json").read_text())
    nets = res["networks"]
    assert len(nets) == 16
    ranked = [n for n in nets if n["converged"]]
    assert len(ranked) >= 6
    for n in ranked:
        assert n["train_loss"] <= res["config"]["target_loss"]
        assert n["gap"] == pytest.approx(n["test_loss"] - n["train_loss"], rel=1e-12)
        for key in ("sharp_p2", "asharp_p2", "sharp_pinf", "asharp_pinf"):
            assert n[key] >= 0
    # The table's numbers are the statistics of the recorded networks (recomputed independently).
    for key in ("sharp_p2", "asharp_p2", "sharp_pinf", "asharp_pinf"):
        tau = tau_b([n[key] for n in ranked], [n["gap"] for n in ranked])
        assert res["stats"][key]["tau"] == pytest.approx(tau, abs=1e-12)
    assert f"{len(ranked)} of 16 networks" in table
    # Same seed, same numbers (to the bit): a rerun into the same folder replaces the files.
    assert cs.main(["--quick", "--out-dir", str(out), "--no-progress"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert [n.get("asharp_p2") for n in again["networks"]] == [n.get("asharp_p2") for n in nets]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study"]  # no temporary folders left behind


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--max-epochs", "0"], "--max-epochs"),
        (["--target-loss", "-1"], "--target-loss"),
        (["--eta", "nan"], "--eta"),
        (["--sharpness-steps", "-1"], "--sharpness-steps"),
        (["--seed", "-2"], "--seed"),
    ],
)
def test_bad_flags(tmp_path, capsys, argv, flag):
    out = tmp_path / "study"
    with pytest.raises(SystemExit) as e:
        cs.main(["--quick", "--out-dir", str(out)] + argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err
    assert not out.exists()


def test_nothing_converges_is_an_error_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "study"
    assert cs.main(["--quick", "--out-dir", str(out), "--max-epochs", "1", "--target-loss", "1e-6", "--no-progress"]) == 1
    assert "--target-loss" in capsys.readouterr().err
    assert not out.exists()
