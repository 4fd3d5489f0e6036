"""scripts/efficiency_study.py --quick: the study's machinery end to end (2 tasks, 2 paired seeds, 6 methods,
1 epoch), with numbers that must hold whatever the accuracies: passes per update, pairing, the summary."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_study_writes_table_json_and_plot(tmp_path):
    out, plot = tmp_path / "out", tmp_path / "eff.png"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "efficiency_study.py"), "--quick", "--out", str(out),
                        "--plot", str(plot)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    runs = res["runs"]
    assert len(runs) == 2 * 2 * 6  # tasks x seeds x methods (40% noise only)
    steps = math.ceil(1437 / 64)  # one epoch of the 1437 training digits
    for r in runs:
        assert r["updates"] == steps
        want = {"sgd": 1.0, "asam": 2.0, "every2": 1 + math.ceil(steps / 2) / steps, "look5-a0.7": 1 + math.ceil(steps / 5) / steps,
                "onepass-prev": 1.0}.get(r["method"])
        if want is not None:
            assert abs(r["passes"] - want) < 1e-12, r
        assert 0 <= r["test_acc"] <= 100
    # Paired seeds: the same seed gives SGD the same result in every invocation (deterministic CPU runs).
    s = res["summary"]["digits-mlp 40% noise"]["methods"]
    assert s["asam"]["diff_to_asam_mean"] == 0.0 and s["asam"]["n_seeds"] == 2
    table = (out / "table.md").read_text()
    assert "Recommended by the fixed rule" in table and "Held-out check" in table
    assert plot.stat().st_size > 10_000
    assert res["heldout"]["runs"] and all(r["noise"] == 0.2 for r in res["heldout"]["runs"])
